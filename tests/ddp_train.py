"""Run by torchrun in tests/test_distributed.py: train a recipe the way `ctprune train` does,
optionally SIGKILL one rank right after a given epoch's checkpoint (a deterministic kill point).
Device: cpu unless a sixth argument names one."""

import os
import signal
import sys

from ctprune.recipe import load_recipe, prepare_data
from ctprune.train import train

recipe_path, out_dir, kill_rank, kill_epoch, mode = sys.argv[1:6]
device = sys.argv[6] if len(sys.argv) > 6 else "cpu"


def kill_point(epoch, model, record):
    if int(os.environ.get("RANK", "0")) == int(kill_rank) and epoch == int(kill_epoch):
        os.kill(os.getpid(), signal.SIGKILL)


recipe = prepare_data(load_recipe(recipe_path))
result = train(recipe.train_recipe(), out_dir, sparsity=recipe.sparsity, device=device,
               resume=mode == "resume", on_epoch_end=kill_point)
print(f"FINAL epochs={result.epochs} checksum={result.parameter_checksum:.6f}")
