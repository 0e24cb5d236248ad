"""``adapters.config_sha256``: the SHA-256 of an adapter's ``adapter_config.json``, pinned beside its
weights' (``revision``).

The revision covered ``adapter_model.safetensors`` only. ``lora_alpha``, ``r`` and the rest of the config
change captions as much as the weights do, so a config edited in place changed the text under the same
``via_revision``, and a worker with a cached copy (IMGQ_ADAPTER_DIR) kept the old config while a fresh
one read the new. ``imgq finetune`` registers both digests, and a worker refuses a config that does not
hash to the registered one. NULL is a registration made before this migration: its config is not
checked until the adapter is registered again.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("config_sha256", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("adapters", "config_sha256")
