"""delivery: an attempt row before any byte leaves, and one deliverer per destination (leases)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('delivery_attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('holder', sa.String(length=128), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('ack_code', sa.String(length=4), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['outbox.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.create_index('uq_delivery_attempt', ['message_id', 'attempt'], unique=True)
        batch_op.create_index(batch_op.f('ix_delivery_attempts_message_id'), ['message_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_delivery_attempts_outcome'), ['outcome'], unique=False)
    op.create_table('delivery_leases',
    sa.Column('destination', sa.String(length=256), nullable=False),
    sa.Column('holder', sa.String(length=128), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('destination')
    )


def downgrade() -> None:
    op.drop_table('delivery_leases')
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_delivery_attempts_outcome'))
        batch_op.drop_index(batch_op.f('ix_delivery_attempts_message_id'))
        batch_op.drop_index('uq_delivery_attempt')
    op.drop_table('delivery_attempts')
