"""Persistence: SQLAlchemy models, Alembic migrations and the repository the daemon works through."""
