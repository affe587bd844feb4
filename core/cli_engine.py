"""CLI commands of the pruning engine (analyse, prune, export); filled in as the engine lands."""
COMMANDS: dict = {}


def add_commands(sub, add_model_args, add_data_args) -> None:
    return None
