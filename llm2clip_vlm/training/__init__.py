"""The training layer every stage shares: one loop, checkpoints, optimiser and schedule helpers,
distributed helpers and the contrastive losses (see docs/ARCHITECTURE.md)."""
