"""Failures a user's environment or values cause become one line naming the key or file,
before any work, instead of "unexpected <Exception>": checked in-process on the code each
command runs (the dispatcher that turns a UserError into exit 2 is end-to-end in
test_reliability)."""

import pytest
import torch
from omegaconf import OmegaConf

from vae_cli.config.components import instantiate
from vae_cli.config.schemas import validate_eval, validate_export
from vae_cli.errors import UserError
from vae_cli.runtime.files import unwritable


@pytest.fixture
def blocked(tmp_path):
    """A folder path that cannot be made: a plain file stands where its parent would be."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "out"


def test_a_folder_behind_a_file_is_unwritable_and_a_fresh_one_is_not(tmp_path, blocked):
    assert "is not a folder" in unwritable(blocked)
    assert unwritable(tmp_path / "new" / "deeper") is None


@pytest.mark.parametrize("validate", [validate_eval, validate_export])
def test_eval_and_export_refuse_an_out_dir_they_cannot_write_before_reading_anything(
        validate, blocked, tmp_path):
    cfg = OmegaConf.create({"ckpt": str(tmp_path / "none.pt"), "out_dir": str(blocked)})
    with pytest.raises(UserError, match=r"out_dir=.* cannot be written") as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_a_librarys_own_range_check_becomes_one_line_naming_the_group():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    node = OmegaConf.create({"_target_": "vae_cli.training.lr_schedules.Plateau", "factor": 2.0})
    with pytest.raises(UserError, match=r"^lr_scheduler: .*[Ff]actor") as e:
        instantiate("lr_scheduler", node, opt, epochs=2, steps_per_epoch=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("target", "key"), [
    ("vae_cli.reports.trackers.TensorBoard", "log_dir"),
    ("vae_cli.reports.trackers.WandB", "dir"),
])
def test_a_tracker_folder_that_cannot_be_written_is_refused_when_built(target, key, blocked):
    node = OmegaConf.create({"_target_": target, key: str(blocked)})
    with pytest.raises(UserError, match=f"logger.{key}=.* cannot be written"):
        instantiate("logger", node)


@pytest.fixture
def saved(finished_run):
    """The checkpoint of a real finished tiny run (only read)."""
    return finished_run / "checkpoints" / "last.pt"


def test_a_checkpoint_of_non_finite_weights_is_refused_by_every_reader(saved, tmp_path):
    from vae_cli.config.build import load_trained
    from vae_cli.runtime import checkpoint

    ckpt = checkpoint.load(saved)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name][...] = float("nan")
    checkpoint.save(tmp_path / "nan.pt", ckpt)
    load_trained(str(saved), torch.device("cpu"))  # the healthy one loads
    with pytest.raises(UserError, match=f"non-finite weights \\({name}\\)"):
        load_trained(str(tmp_path / "nan.pt"), torch.device("cpu"))


def test_a_reader_may_move_the_data_but_not_change_what_it_is(saved, tmp_path):
    from vae_cli.config.build import load_data
    from vae_cli.runtime import checkpoint

    ckpt = checkpoint.load(saved)
    root = ckpt["config"]["dataset"]["root"]
    load_data(ckpt, OmegaConf.create({"root": root, "image_size": None}), torch.device("cpu"))
    with pytest.raises(UserError, match=r"dataset.image_size=8 differs from the checkpoint's"):
        load_data(ckpt, OmegaConf.create({"image_size": 8}), torch.device("cpu"))


def test_eval_json_stays_valid_json_whatever_the_numbers(tmp_path):
    import json

    from vae_cli.runtime.run_folder import read_eval, write_eval

    def strict(text):  # Python's json reads NaN; JSON, and every other reader, does not
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"wrote {c}"))

    path = write_eval(tmp_path / "eval.json",
                      {"nelbo": float("nan"), "kl": [1.0, float("inf")], "units": 3})
    assert strict(path.read_text()) == {"nelbo": None, "kl": [1.0, None], "units": 3}
    assert read_eval(path)["units"] == 3


def test_a_deeply_nested_eval_json_is_an_unreadable_file_not_a_recursion_error(tmp_path):
    from vae_cli.runtime.run_folder import RunFileError, read_eval

    path = tmp_path / "eval.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(RunFileError, match="is unreadable"):
        read_eval(path)


@pytest.mark.parametrize(("metrics", "results", "why"), [
    ("epoch,val_loss\n1,2.0\n", {"nll_iwae": {"mean": 80.0}}, "nll_iwae is dict, not a number"),
    ("epoch,val_loss\n1,2.0\n", {"mig": True}, "mig is bool, not a number"),
    ("epoch,val_loss\n1,2.0\n", {"fd_shapes_features": "12"}, "is str, not a number"),
    ("epoch,val_loss,kl\n1,2.0,3\n2,1.5\n", {}, "line 3 has another number of cells"),
    ("epoch,val_loss\n1,2.0,3,4\n", {}, "line 2 has another number of cells"),
    ("epoch,val_loss\n1,abc\n", {}, "line 2: val_loss='abc' is not a number"),
    ("epoch,val_loss\nfoo,2.0\n", {}, "line 2: epoch='foo' is not an epoch count"),
])
def test_compare_skips_a_run_whose_shown_values_are_not_numbers_naming_the_file(
        tmp_path, metrics, results, why):
    import json

    from hostile import in_process

    for name, result in (("good", {"nll_iwae": 81.0, "mig": None}), ("bad", results)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(
            metrics if name == "bad" else "epoch,val_loss\n1,2.0\n")
        (tmp_path / name / "eval.json").write_text(json.dumps({"kl": [1, 2], **result}))
    done = in_process("compare", str(tmp_path / "good"), str(tmp_path / "bad"),
                      "--out", str(tmp_path / "table"), cwd=tmp_path)
    warning, = done.stderr.strip().splitlines()
    assert warning.startswith(f"warning: skipped {tmp_path / 'bad'}: ") and why in warning
    assert "81.0000" in done.stdout and str(tmp_path / "bad") not in done.stdout


def test_conditional_labels_must_be_the_class_ids_0_to_c_minus_1():
    from vae_cli.data.base import ImageData

    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)

    def data(train_labels):
        labels = {"train": torch.tensor(train_labels), "val": torch.tensor([0, 1, 2, 0]),
                  "test": torch.tensor([1, 2, 0, 1])}
        return ImageData("toy", images, images, images, labels=labels)

    data([0, 1, 2, 2]).check_class_ids()
    with pytest.raises(UserError, match="4 class ids from 0 to 255"):
        data([0, 1, 2, 255]).check_class_ids()


def test_files_a_run_writes_follow_the_umask(tmp_path):
    import os

    from vae_cli.runtime import files

    path = files.write_text(tmp_path / "a.txt", "x")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~files.UMASK


def test_a_vocabulary_holds_only_words_a_model_sees():
    from vae_cli.data.vocab import Vocab

    v = Vocab.build(["a b c d", "a b"], "word", max_length=2)
    assert "a" in v.itos and "b" in v.itos and "c" not in v.itos and "d" not in v.itos
    assert "d" in Vocab.build(["a b c d"], "word").itos


def test_text_pictures_of_a_split_of_one_line_skip_the_interpolations(tmp_path):
    from vae_cli.data.text import encode_splits
    from vae_cli.nets import rnn
    from vae_cli.objective.likelihoods import Categorical
    from vae_cli.objective.model import VAE
    from vae_cli.objective.posteriors import DiagonalGaussian
    from vae_cli.objective.priors import NormalPrior
    from vae_cli.reports.text_outputs import write_text_pictures

    lines = {"train": ["a b c", "b c a", "c a b"], "val": ["a b"], "test": ["b a"]}
    data = encode_splits("toy", lines, "word", 1, 6)
    nets = rnn.build(latent_dim=2, shape=tuple(data.shape), vocab_size=len(data.vocab),
                     embed_dim=4, hidden=8)
    model = VAE(nets, DiagonalGaussian(), NormalPrior(latent_dim=2),
                Categorical(classes=len(data.vocab)), 2)
    written = write_text_pictures(model, data, "val", tmp_path)
    assert {p.name for p in written} == {"reconstructions.txt", "latent_scatter.png"}


def test_labels_that_do_not_match_their_images_are_named_not_an_index_error():
    from vae_cli.data.standard import split_train_val

    x = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(UserError, match="7 training labels for 10 training images"):
        split_train_val(x, torch.zeros(7, dtype=torch.long), 2, 0, "MNIST")
    assert len(split_train_val(x, torch.zeros(10, dtype=torch.long), 2, 0, "MNIST")[0]) == 8


def test_metrics_named_but_not_computable_are_refused_and_few_examples_said(caplog):
    from vae_cli.commands.eval import check_metrics
    from vae_cli.config.schemas import DISENTANGLEMENT_METRICS
    from vae_cli.evaluation.disentanglement.suite import score

    with pytest.raises(UserError, match=r"metrics=\['mig'\] need ground-truth factors"):
        check_metrics(["mig"], False, "mnist")
    check_metrics(list(DISENTANGLEMENT_METRICS), False, "mnist")  # the default: nothing asked
    check_metrics(["mig"], True, "shapes")
    z, factors = torch.randn(3, 2), torch.randint(0, 2, (3, 2))
    settings = {"metrics": ["mig"], "test_fraction": 0.333}
    score(z, factors, ["a", "b"], settings, 0, 4)
    assert "on 3 examples are rough estimates" in caplog.text


def test_a_refused_start_leaves_no_file_behind(tmp_path):
    from hostile import in_process

    from vae_cli.runtime.run_folder import RunFolder

    fresh = tmp_path / "fresh"
    done = in_process("train", "trainer.epochs=-1", f"hydra.run.dir={fresh}", cwd=tmp_path,
                      check=False)
    assert done.returncode == 2 and not fresh.exists()
    other = tmp_path / "other"  # another run's folder: a refused start into it adds nothing
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "config.yaml").write_text("theirs: 1\n")
    RunFolder(other).metrics.write_text("epoch,loss\n1,2.0\n")
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    done = in_process("train", "dataset.n_train=64", "dataset.n_val=16", "dataset.n_test=16",
                      f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={other}",
                      cwd=tmp_path, check=False)
    assert done.returncode == 2 and "already holds a run" in done.stderr
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before


# Class 7: each bound refused in one line naming the key and the override that lifts it.
@pytest.mark.parametrize(("command", "override"), [
    ("train", "posterior=planar posterior.steps=100000"),
    ("train", "trainer.num_images=100000"),
    ("train", "trainer.iw_samples=1000000"),
    ("train", "posterior=vq posterior.codes=100000000000"),
    ("train", "posterior=fsq posterior.levels=[100000,100000,100000,100000]"),
    ("eval", "eval.iw_samples=100000000"),
    ("eval", "sampler=gmm sampler.components=1000000"),
    ("sample", "num_samples=1000000"),
    ("sample", "fd.samples=10000000"),
])
def test_a_setting_past_its_resource_bound_is_refused_naming_the_lift(
        compose_cfg, command, override):
    from vae_cli.config.schemas import validate_sample, validate_train

    validate = {"train": validate_train, "eval": validate_eval, "sample": validate_sample}
    args = [*override.split(), *([] if command == "train" else ["ckpt=x.pt"])]
    key = args[-1 if command == "train" else -2].split("=")[0]
    with pytest.raises(UserError, match=rf"^{key}=[\d\[][\d, ]*\]? is past its bound .*lim"):
        validate[command](compose_cfg(args, name=command))
    validate[command](compose_cfg([*args, "limits=false"], name=command))


def test_a_model_past_the_parameter_bound_is_refused_before_it_moves_to_a_device():
    from vae_cli.config import limits

    bound = limits.MAX_PARAMETERS
    limits.check_parameters(bound, OmegaConf.create({}))
    with pytest.raises(UserError, match="parameters, past the bound .*limits=false"):
        limits.check_parameters(bound + 1, OmegaConf.create({}))
    limits.check_parameters(bound + 1, OmegaConf.create({"limits": False}))


@pytest.mark.parametrize("overrides", [["model=mlp"], ["model=conv", "prior=vamp"],
                                       ["model=hvae"]])
def test_the_parameter_count_is_known_before_the_model_is_allocated(compose_cfg, overrides):
    """The bound is checked on a build on the meta device: the real build's count, without
    memory or random draws; a model that cannot be built there (vdvae reads values while
    it is built) is counted after its build instead."""
    from vae_cli.config.build import build_objective, planned_parameters
    from vae_cli.config.schemas import validate_train

    cfg = validate_train(compose_cfg(overrides))
    rng = torch.get_rng_state()
    planned = planned_parameters(cfg, (1, 28, 28), 100)
    assert torch.equal(torch.get_rng_state(), rng)
    assert planned == sum(p.numel() for p in build_objective(cfg, (1, 28, 28), 100).parameters())
    vdvae = validate_train(compose_cfg(["model=vdvae"]))
    assert planned_parameters(vdvae, (1, 28, 28), 100) is None


def test_the_iwae_bound_reports_its_progress_in_decodes(monkeypatch, saved):
    """The longest loop of `vae eval` draws a bar whose count reaches examples x k."""
    import io

    from tqdm import tqdm

    from vae_cli.config.build import load_trained
    from vae_cli.evaluation import likelihood
    from vae_cli.runtime import checkpoint

    bars = []

    def shown(total, desc, unit="it", **_):
        bars.append(tqdm(total=total, desc=desc, unit=unit, file=io.StringIO(),
                         disable=False))
        return bars[-1]

    monkeypatch.setattr(likelihood, "bar", shown)
    objective, _ = load_trained(str(saved), torch.device("cpu"))
    x = torch.randint(0, 256, (10, *checkpoint.load(saved)["shape"]), dtype=torch.uint8)
    likelihood.iwae_bound(objective.model, x, k=7, batch_size=4, max_decoded=8)
    assert bars[0].total == bars[0].n == 70 and "k=7" in bars[0].desc


@pytest.mark.parametrize(("edit", "named"), [
    (lambda s: s.update(last_epoch="12"), "lr_scheduler.last_epoch='12' is not a number"),
    (lambda s: s.update(_last_lr=[0.1, 0.1]), "lr_scheduler._last_lr has another length"),
    (lambda s: s["_schedulers"][0].update(_is_initial=0), "_is_initial=0 is of another kind"),
    (lambda s: s["_schedulers"][1].update(T_max=float("nan")), "T_max=nan is not a number"),
    (lambda s: s.update(optimizer=None), "lr_scheduler sets optimizer"),
    (lambda s: s.update(_schedulers={}), "_schedulers has another length"),
])
def test_an_edited_schedule_state_is_refused_when_loaded_not_steps_later(edit, named):
    from vae_cli.training.lr_schedules import Cosine

    def cosine():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return Cosine(opt, steps_per_epoch=10, epochs=5)

    first = cosine()
    for _ in range(13):
        first.advance("step")
    state = first.state_dict()
    loose = {**state, "_from_another_torch": 1}  # fields torch versions add or drop pass
    del loose["_milestones"]
    second = cosine()
    second.optimizer.load_state_dict(first.optimizer.state_dict())  # as a resume does
    second.load_state_dict(loose)
    first.advance("step")
    second.advance("step")
    assert second.lr == first.lr != cosine().lr
    edit(state)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace(".", r"\.")):
        cosine().load_state_dict(state)


def test_a_sigterm_inside_torchs_onnx_exporter_is_a_signal_not_its_export_error(
        saved, tmp_path, monkeypatch):
    """torch.onnx.export wraps whatever its tracing raised in a TorchExportError: a real
    SIGTERM delivered while it traces the encoder still ends `vae export` with one line and
    128 + 15, and writes nothing."""
    import os
    import signal

    from hostile import in_process

    from vae_cli.export import onnx_graphs

    traced = onnx_graphs.to_onnx

    def terminated_midway(model, x, z):
        def once(*_):
            hook.remove()
            os.kill(os.getpid(), signal.SIGTERM)

        hook = model.encoder.register_forward_hook(once)
        return traced(model, x, z)

    monkeypatch.setattr(onnx_graphs, "to_onnx", terminated_midway)
    out = tmp_path / "onnx"
    done = in_process("export", f"ckpt={saved}", "format=onnx", f"out_dir={out}",
                      cwd=tmp_path, check=False)
    assert (done.returncode, done.stderr) == (143, "error: SIGTERM received; stopped\n")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("inner", "code", "line"), [
    ("signal", 143, "error: SIGTERM received; stopped\n"),
    ("user", 2, "error: the file x is not an image\n"),
])
def test_a_signal_or_refusal_a_library_wrapped_in_its_own_error_keeps_its_exit(
        inner, code, line, capsys):
    """A library that catches and re-raises as its own type (torch's exporter reports what
    its tracing hit as a TorchExportError) hides neither from the dispatcher."""
    import signal

    from vae_cli.commands.main import guarded
    from vae_cli.training.signals import Signalled

    def task(cfg):
        try:
            raise Signalled(signal.SIGTERM) if inner == "signal" else \
                UserError("the file x is not an image")
        except BaseException as e:
            raise RuntimeError("export failed, see the report") from e

    with pytest.raises(SystemExit) as e:
        guarded(task, full_error=False)(None)
    assert (e.value.code, capsys.readouterr().err) == (code, line)


def test_trainer_pictures_false_writes_no_picture_and_trains_the_same_run(tmp_path):
    """Sweeps of many tiny jobs skip the pictures; the pictures draw from their own seeded
    streams, so the run itself is unchanged."""
    from hostile import in_process

    runs = {}
    for pictures in ("true", "false"):
        runs[pictures] = tmp_path / pictures
        in_process("train", "dataset.n_train=128", "dataset.n_val=32", "dataset.n_test=32",
                   "dataset.image_size=16", "model.hidden=[32]", "model.latent_dim=3",
                   "trainer.epochs=2", "trainer.batch_size=32", "trainer.num_images=8",
                   f"trainer.pictures={pictures}", f"dataset.root={tmp_path / 'data'}",
                   f"hydra.run.dir={runs[pictures]}", cwd=tmp_path)
    assert not list(runs["false"].rglob("*.png")) and list(runs["true"].rglob("*.png"))
    assert (runs["false"] / "metrics.csv").read_bytes() == \
        (runs["true"] / "metrics.csv").read_bytes()
