import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from vae_cli.commands.main import register_resolvers
from vae_cli.config.registry import config_dir

# Several test processes share the cores (pytest-xdist): one thread each, here and in the
# commands the tests start, rather than each spawning a thread per core.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _composer():
    """Compose a config exactly as `vae <command>` would, without running it."""
    register_resolvers()

    def _compose(overrides=(), name="train"):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))

    return _compose


@pytest.fixture
def compose_cfg():
    return _composer()


@pytest.fixture(scope="module")
def compose_cfg_module():
    return _composer()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished tiny run (TINY, one epoch) per test process, trained in-process by the
    real dispatcher, for tests that need a run rather than check how it was trained. Tests
    that change a run work on hostile.copy_run(finished_run, tmp_path / ...)."""
    from hostile import in_process, once
    from test_cli import TINY

    def train():
        tmp = tmp_path_factory.mktemp("finished")
        in_process("train", *TINY, "trainer.epochs=1", f"dataset.root={tmp / 'data'}",
                   f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
        return tmp / "run"

    return once("finished_run", train)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """An LPIPS(VGG) state dict written through the loader a user's machine runs: the lpips
    package's own learned heads, on a VGG16 trunk without ImageNet weights (no download);
    written once per test process."""
    lpips = pytest.importorskip("lpips")
    import warnings

    from hostile import once

    def write():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.pt"
        torch.save(net.state_dict(), path)
        return path

    return once("lpips_file", write)
