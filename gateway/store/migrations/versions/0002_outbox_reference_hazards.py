"""outbox, reference hazards, patient demographics

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('study_version', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=256), nullable=False),
    sa.Column('control_id', sa.String(length=64), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('correction', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('ack_code', sa.String(length=4), nullable=True),
    sa.Column('ack_text', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('control_id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_drain', ['destination', 'state', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_study_id'), ['study_id'], unique=False)

    op.create_table('reference_hazards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('model_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=False),
    sa.Column('log_hazard', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reference_hazards', schema=None) as batch_op:
        batch_op.create_index('ix_reference_lookup', ['label', 'model_hash', 'log_hazard'], unique=False)
        batch_op.create_index('uq_reference_study_label', ['study_id', 'label'], unique=True)

    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_name', sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column('birth_date', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('sex', sa.String(length=1), nullable=True))
        batch_op.add_column(sa.Column('recording_start', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('flags', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('bundle_validated', sa.Boolean(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('bundle_validated')
        batch_op.drop_column('flags')
        batch_op.drop_column('recording_start')
        batch_op.drop_column('sex')
        batch_op.drop_column('birth_date')
        batch_op.drop_column('patient_name')

    with op.batch_alter_table('reference_hazards', schema=None) as batch_op:
        batch_op.drop_index('uq_reference_study_label')
        batch_op.drop_index('ix_reference_lookup')

    op.drop_table('reference_hazards')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_study_id'))
        batch_op.drop_index('ix_outbox_drain')

    op.drop_table('outbox')
