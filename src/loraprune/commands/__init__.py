"""CLI subcommands, one module each (see loraprune.cli)."""
