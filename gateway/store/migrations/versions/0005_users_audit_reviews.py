"""users and access: console users, the append-only access audit, reviewed marks, studies.scorer

The access audit is append-only in the database itself: triggers refuse UPDATE and DELETE (and, on
PostgreSQL, TRUNCATE) of ``access_audit``, whoever connects. A later migration that recreates the
table (SQLite batch mode) must create the triggers again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-14
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_REFUSED = 'access_audit is append-only'

_PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION psg_access_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '{_REFUSED}: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql
"""


def _append_only_triggers() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(_PG_FUNCTION)
        op.execute('CREATE TRIGGER access_audit_no_update_delete BEFORE UPDATE OR DELETE ON access_audit '
                   'FOR EACH ROW EXECUTE FUNCTION psg_access_audit_append_only()')
        op.execute('CREATE TRIGGER access_audit_no_truncate BEFORE TRUNCATE ON access_audit '
                   'FOR EACH STATEMENT EXECUTE FUNCTION psg_access_audit_append_only()')
    else:  # SQLite
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f'CREATE TRIGGER access_audit_no_{verb.lower()} BEFORE {verb} ON access_audit '
                       f"BEGIN SELECT RAISE(ABORT, '{_REFUSED}: {verb} refused'); END")


def _drop_append_only_triggers() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('DROP TRIGGER IF EXISTS access_audit_no_truncate ON access_audit')
        op.execute('DROP TRIGGER IF EXISTS access_audit_no_update_delete ON access_audit')
        op.execute('DROP FUNCTION IF EXISTS psg_access_audit_append_only()')
    else:
        op.execute('DROP TRIGGER IF EXISTS access_audit_no_update')
        op.execute('DROP TRIGGER IF EXISTS access_audit_no_delete')


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('failed_logins', sa.Integer(), nullable=False),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('access_audit',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_name', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('study_key', sa.String(length=32), nullable=True),
    sa.Column('target', sa.String(length=256), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.Column('remote_addr', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('access_audit', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_access_audit_at'), ['at'], unique=False)
    _append_only_triggers()
    op.create_table('study_reviews',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('reviewer', sa.String(length=64), nullable=False),
    sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('study_reviews', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_reviews_study_id'), ['study_id'], unique=False)
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scorer', sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('scorer')
    with op.batch_alter_table('study_reviews', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_reviews_study_id'))
    op.drop_table('study_reviews')
    _drop_append_only_triggers()
    with op.batch_alter_table('access_audit', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_access_audit_at'))
    op.drop_table('access_audit')
    op.drop_table('users')
