import pytest
from hydra import compose, initialize_config_dir

from vae_cli.commands.main import register_resolvers
from vae_cli.config.registry import config_dir


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
