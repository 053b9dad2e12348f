"""The method: config, architecture table, LoRA access, criteria, masks, schedule, prunings and the
objective. Nothing here reads or writes run directories."""
