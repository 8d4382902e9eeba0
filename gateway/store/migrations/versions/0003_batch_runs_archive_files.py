"""archive batch: batch runs, the archive file hash cache, studies.batch_run_id

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('batch_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(length=256), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('options', sa.JSON(), nullable=True),
    sa.Column('summary', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('archive_files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('archive_files', schema=None) as batch_op:
        batch_op.create_index('uq_archive_files_path', ['path'], unique=True)
        batch_op.create_index(batch_op.f('ix_archive_files_study_id'), ['study_id'], unique=False)

    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_run_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_batch_run_id'), ['batch_run_id'], unique=False)
        batch_op.create_foreign_key('fk_studies_batch_run_id', 'batch_runs', ['batch_run_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_constraint('fk_studies_batch_run_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_studies_batch_run_id'))
        batch_op.drop_column('batch_run_id')
    with op.batch_alter_table('archive_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_archive_files_study_id'))
        batch_op.drop_index('uq_archive_files_path')
    op.drop_table('archive_files')
    op.drop_table('batch_runs')
