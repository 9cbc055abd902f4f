"""team limits: per-team overrides of the SQUEEZE_TEAM_* fairness defaults (NULL: the server's default)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 12:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

COLUMNS = (('max_running', sa.Integer()), ('max_queued', sa.Integer()), ('max_upload_bytes', sa.BigInteger()),
           ('uploads_per_minute', sa.Integer()), ('max_priority', sa.Integer()))


def upgrade() -> None:
    with op.batch_alter_table('teams', schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('teams', schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
