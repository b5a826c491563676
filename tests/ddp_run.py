"""Run by torchrun in tests/test_distributed_run.py: `ctprune run` of a recipe (with --set
overrides) whose rank ``kill_rank`` SIGKILLs itself at the end of its ``kill_at``-th training
epoch of the whole run (counted over the stages), a deterministic kill point.
Arguments: recipe, out_dir, kill_rank, kill_at, then --set values."""

import os
import signal
import sys

from ctprune.recipe import load_recipe
from ctprune.run import run_recipe

recipe_path, out_dir, kill_rank, kill_at, *overrides = sys.argv[1:]
epochs_done = 0


def kill_point(epoch, model, record):
    global epochs_done
    epochs_done += 1
    if int(os.environ.get("RANK", "0")) == int(kill_rank) and epochs_done == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)


run_recipe(load_recipe(recipe_path, overrides), out_dir, device="cpu", on_epoch_end=kill_point)
