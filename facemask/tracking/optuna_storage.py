"""The Optuna storage of `hparams_search=optuna`, built by Hydra from `hydra.sweeper.storage`."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


def _stamp_alembic_in_transaction(version_manager, revision: str) -> None:
    import alembic.migration

    with version_manager.engine.begin() as connection:
        context = alembic.migration.MigrationContext.configure(connection)
        context.stamp(version_manager._create_alembic_script(), revision)


def _patch_optuna2_for_sqlalchemy2() -> None:
    """Commit the schema version that Optuna 2 writes when it creates a new database.

    hydra-optuna-sweeper requires Optuna < 3, whose RDB storage stamps the Alembic revision on a
    connection that SQLAlchemy 2 never commits. Opening the new database then fails with a bare
    AssertionError in `get_current_version`. Optuna 3 and later stamp inside a transaction.
    """
    if int(optuna.__version__.split(".")[0]) >= 3:
        return
    from optuna.storages._rdb import storage as rdb_storage

    version_manager = rdb_storage._VersionManager
    if version_manager._set_alembic_revision is not _stamp_alembic_in_transaction:
        version_manager._set_alembic_revision = _stamp_alembic_in_transaction


def open_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """Open the study database at `url`, or return None to keep the study in memory.

    A SQLite file's folder is created first. Any SQLAlchemy URL that Optuna supports works, for
    example `postgresql://user@host/db` for a search shared by several machines.
    """
    if not url:
        log.info("Optuna study kept in memory: it ends with this sweep")
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    _patch_optuna2_for_sqlalchemy2()
    log.info("Optuna study stored in %s", parsed.render_as_string(hide_password=True))
    return optuna.storages.RDBStorage(url)
