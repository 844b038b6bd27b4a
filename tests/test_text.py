"""Sequences: vocabulary, masked token likelihood, perplexity, the rnn model with every prior
and divergence, homotopies, and the text datasets' files and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hostile import in_process
from omegaconf import OmegaConf
from test_cli import DATA

from vae_cli.config.build import build_objective
from vae_cli.config.components import instantiate
from vae_cli.config.schemas import validate_train as validate
from vae_cli.data.batching import ordered, shuffled
from vae_cli.data.text import TextData, ptb, text
from vae_cli.data.vocab import Vocab
from vae_cli.errors import UserError
from vae_cli.evaluation.evaluate import evaluate
from vae_cli.evaluation.likelihood import iwae_bound
from vae_cli.evaluation.units import per_unit
from vae_cli.objective.likelihoods import Categorical, sequence_nll
from vae_cli.reports.text_outputs import homotopy, lines
from vae_cli.tokens import BOS, EOS, PAD, SPECIALS, UNK, lengths, trim
from vae_cli.training.recipe import check_position, setup

CORPUS = ["the cat sat", "the dog sat", "a cat ran", "the bird sang", "a dog ran fast"] * 8
TINY_RNN = ["model=rnn", "loss=categorical", "model.embed_dim=8", "model.hidden=16",
            "model.latent_dim=3", "trainer.device=cpu"]


def write_corpus(path, lines_=CORPUS):
    path.write_text("\n".join(lines_) + "\n", encoding="utf-8")
    return path


# --- vocabulary ------------------------------------------------------------------------

def test_vocab_round_trip_unknown_tokens_and_stable_ids():
    v = Vocab.build(["b a a", "c a b", "d"], "word", min_freq=2)
    assert v.itos == [*SPECIALS, "a", "b"]  # by frequency; d and c are rarer than min_freq
    ids, cut = v.encode(["a b", "b zebra a"], max_length=4)
    assert cut == 0
    assert ids.tolist() == [[4, 5, EOS, PAD, PAD], [5, UNK, 4, EOS, PAD]]
    assert v.decode(ids[0]) == "a b"
    assert v.decode(ids[1]) == "b <unk> a"
    again = Vocab.from_state(v.state())
    assert again.itos == v.itos and again.tokens == "word"
    assert Vocab.build(["b a a", "c a b", "d"], "word", 2).itos == v.itos


def test_char_vocab_and_cut_lines():
    v = Vocab.build(["hello", "help"], "char")
    ids, cut = v.encode(["hello world"], max_length=5)
    assert cut == 1 and v.decode(ids[0]) == "hello"
    assert ids[0, -1] == EOS  # a cut line still ends in <eos>
    with pytest.raises(UserError, match="special tokens"):
        Vocab(["a", "b"], "word")


# --- masked likelihood and perplexity --------------------------------------------------

def test_padding_never_contributes_to_the_loss():
    torch.manual_seed(0)
    x = torch.tensor([[5, 6, EOS, PAD, PAD], [7, EOS, PAD, PAD, PAD]])
    dense = torch.randn(2, 5, 9)
    logits = dense[x != PAD].requires_grad_()  # the decoder scores real positions only
    nll = sequence_nll(logits, x)
    by_hand = [-sum(dense[b, t].log_softmax(-1)[x[b, t]] for t in range(5) if x[b, t] != PAD)
               for b in range(2)]
    assert torch.allclose(nll, torch.stack(by_hand))
    nll.sum().backward()
    assert logits.grad.abs().amax(-1).min() > 0  # every scored position has a gradient
    # trailing <pad> columns change nothing: the same logits score the trimmed batch
    assert trim(x).shape == (2, 3) and torch.allclose(sequence_nll(logits, trim(x)), nll)
    assert torch.equal(Categorical().nll(logits, x), nll)


def test_perplexity_is_exp_of_nll_per_token_on_a_hand_case():
    x = torch.tensor([[4, 5, EOS, PAD], [EOS, PAD, PAD, PAD]])  # 3 + 1 scored tokens
    uniform = torch.zeros(4, 6)
    nll = sequence_nll(uniform, x)
    assert torch.allclose(nll, torch.tensor([3 * math.log(6), math.log(6)]))
    units = per_unit(nll.mean().item(), x)
    assert units["ppl"] == pytest.approx(6.0) and units["nll_token"] == pytest.approx(math.log(6))
    # per sequence 2 and 6 nats over 4 tokens: exp(8 / 4), not the mean of per-line values
    assert per_unit(4.0, x)["ppl"] == pytest.approx(math.exp(2.0))
    assert per_unit(4.0, x, "_iwae").keys() == {"nll_token_iwae", "ppl_iwae"}


# --- datasets ----------------------------------------------------------------------------

def test_text_file_splits_and_separate_files(tmp_path):
    f = write_corpus(tmp_path / "c.txt", [f"line {i}" for i in range(40)] + ["", "  "])
    d = text(str(f), tokens="char", val_fraction=0.1, test_fraction=0.2)
    assert (len(d.train), len(d.val), len(d.test)) == (28, 4, 8)  # blank lines dropped
    seen = {d.vocab.decode(r) for s in ("train", "val", "test") for r in d.split(s)}
    assert len(seen) == 40
    val = write_corpus(tmp_path / "v.txt", ["line 0", "unseen words"])
    d2 = text(str(f), val_path=str(val), test_fraction=0.1)
    assert len(d2.val) == 2 and len(d2.train) + len(d2.test) == 40
    assert d2.vocab.decode(d2.val[1]) == "<unk> <unk>"  # vocabulary from train only
    # a stored vocabulary is used as is, not rebuilt from the file
    d3 = text(str(f), vocab=d2.vocab.itos, val_fraction=0.1, test_fraction=0.1)
    assert d3.vocab.itos == d2.vocab.itos


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "set dataset.path=<file>"),
    ({"path": "/nonexistent/corpus.txt"}, "corpus.txt is not a file; set dataset.path"),
    ({"path": "FILE", "val_path": "/no/val.txt"}, "set dataset.val_path"),
    ({"path": "FILE", "tokens": "bytes"}, "dataset.tokens='bytes'"),
    ({"path": "FILE", "max_length": 0}, "dataset.max_length must be a positive"),
    ({"path": "SHORT"}, "too few to split"),
])
def test_text_dataset_errors(tmp_path, kwargs, fragment):
    full, short = write_corpus(tmp_path / "c.txt"), write_corpus(tmp_path / "s.txt", ["a b"])
    swap = {"FILE": str(full), "SHORT": str(short)}
    kwargs = {k: swap.get(v, v) for k, v in kwargs.items()}
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        text(**kwargs)


def test_ptb_reads_its_files_and_names_the_missing_one(tmp_path):
    with pytest.raises(UserError, match=r"ptb\.train\.txt is not a file; set dataset.root"):
        ptb(str(tmp_path), download=False)
    folder = tmp_path / "ptb"
    folder.mkdir()
    for name, rows in (("ptb.train.txt", [" the <unk> rose N % ", " a b c "]),
                       ("ptb.valid.txt", [" the a "]), ("ptb.test.txt", [" c zz "])):
        write_corpus(folder / name, rows)
    d = ptb(str(tmp_path), download=False)
    assert d.vocab.decode(d.train[0]) == "the <unk> rose N %"
    assert d.vocab.stoi["<unk>"] == UNK  # PTB's own <unk> is the vocabulary's
    assert d.vocab.decode(d.test[0]) == "c <unk>"
    assert d.shape == (83,)


# --- the model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")


def _model(compose, corpus_file, *overrides):
    cfg = validate(compose(["dataset=text", f"dataset.path={corpus_file}", *TINY_RNN,
                            *overrides]))
    data = instantiate("dataset", cfg.dataset)
    return build_objective(cfg, data.shape, len(data.train), len(data.vocab)), data


@pytest.mark.parametrize("divergence", ["kl", "mmd", "sliced", "adversarial", "tc"])
@pytest.mark.parametrize("prior", ["normal", "learned", "mog", "vamp"])
def test_every_prior_and_divergence_trains_the_rnn(compose_cfg_module, corpus_file,
                                                   divergence, prior):
    torch.manual_seed(0)
    small = ["prior.components=4"] if prior in ("mog", "vamp") else []
    model, data = _model(compose_cfg_module, corpus_file, f"divergence={divergence}",
                         f"prior={prior}", *small, "model.word_dropout=0.3")
    opt = torch.optim.Adam(model.main_parameters(), 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        out, _ = model(data.train[:16], 0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(torch.isfinite(v).all() for v in out.values())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("model.encoder.") for n in moved) and any(
        n.startswith("model.decoder.") for n in moved)
    if prior == "vamp":
        assert "model.prior.pseudo" in moved  # pseudo-inputs: embedded sequences, trained too
        assert model.model.prior.pseudo.shape[1:] == (data.shape[0], 8)


@pytest.mark.parametrize("cell, condition", [("gru", "init"), ("lstm", "both"),
                                             ("gru", "input")])
def test_iwae_bound_is_at_least_the_elbo_for_sequences(compose_cfg_module, corpus_file, cell,
                                                       condition):
    torch.manual_seed(0)
    model, data = _model(compose_cfg_module, corpus_file, f"model.cell={cell}",
                         f"model.condition={condition}", "model.bidirectional=true")
    model.eval()
    x = data.val
    bound = iwae_bound(model.model, x, k=50, batch_size=3, max_decoded=20)
    assert -bound["nll_iwae"] >= -bound["nelbo_iw"]
    scored = evaluate(model, x, batch_size=4)
    assert {"ppl", "nll_token"} <= scored.keys() and "bpd" not in scored
    assert scored["ppl"] == pytest.approx(math.exp(scored["nelbo"] * len(x)
                                                   / (x != PAD).sum().item()))


def padded_log_px(model, z, x):
    """log p(x|z) as computed before batches were trimmed: the decoder over every position
    of x padded to the dataset's length, the vocabulary projection on each, <pad> masked."""
    dec = model.decoder
    prev = torch.cat([torch.full_like(x[:, :1], BOS), x[:, :-1]], 1)
    out, _ = dec.rnn(dec.inputs(prev, z), dec.initial_state(z))
    nll = F.cross_entropy(dec.out(out).flatten(0, 1), x.flatten(), ignore_index=PAD,
                          reduction="none")
    return -nll.view(x.shape).sum(-1)


@pytest.mark.parametrize("cell, condition, bidirectional", [("gru", "init", False),
                                                            ("lstm", "both", True)])
def test_trimmed_batches_score_what_the_padded_computation_did(compose_cfg_module,
                                                               corpus_file, cell, condition,
                                                               bidirectional):
    """Trimming a batch to its longest line and projecting real positions only is exact:
    the same posterior, log p(x|z) per sequence (one sample or k) and gradients as the
    decoder run over the padding of a dataset's full length."""
    torch.manual_seed(0)
    objective, data = _model(compose_cfg_module, corpus_file, f"model.cell={cell}",
                             f"model.condition={condition}",
                             f"model.bidirectional={bidirectional}")
    model = objective.model.eval()
    x = data.vocab.encode(CORPUS[:5], 64)[0]  # padded to max_length + 1 = 65 columns
    xb = trim(x)
    assert xb.shape[1] == 5 and torch.equal(x[:, :5], xb) and (x[:, 5:] == PAD).all()
    # The encoder reads each line's state at its own end (packed), padded or alone.
    alone = torch.cat([model.posterior(row[row != PAD][None]).mean for row in x])
    assert torch.allclose(model.posterior(x).mean, model.posterior(xb).mean)
    assert torch.allclose(model.posterior(xb).mean, alone, atol=1e-6)
    z = torch.randn(4, len(x), 3)
    want = torch.stack([padded_log_px(model, zi, x) for zi in z])
    assert torch.allclose(model.log_px(z[0], xb), want[0], rtol=1e-5)
    assert torch.allclose(model.log_px(z, xb), want, rtol=1e-5)  # k samples, as IWAE
    grads = []
    for loss in (lambda: -model.log_px(z[0], xb).sum(), lambda: -want[0].sum()):
        model.zero_grad()
        loss().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.decoder.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_batches_are_trimmed_rows_of_the_same_order():
    x = torch.full((6, 9), PAD)
    for i, n in enumerate([1, 2, 6, 1, 3, 2]):
        x[i, :n], x[i, n] = 7, EOS
    got = [b for b, _ in shuffled(x, 2, torch.Generator().manual_seed(3))]
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    for i, b in enumerate(got):
        rows = x[perm[2 * i:2 * i + 2]]
        assert torch.equal(b, rows[:, :b.shape[1]]) and (rows[:, b.shape[1] - 1] == EOS).any()
    assert [b.shape[1] for b in ordered(x, 4)] == [7, 4]


def _numbered_lines(lengths_):
    """Token rows whose first id names the row, of the given lengths (before <eos>)."""
    x = torch.full((len(lengths_), max(lengths_) + 2), PAD)
    for i, n in enumerate(lengths_):
        x[i, :n], x[i, n] = 7, EOS
        x[i, 0] = 10 + i
    return x


def test_bucketed_batches_regroup_the_same_lines_by_length_reproducibly():
    x = _numbered_lines(torch.randint(1, 30, (203,), generator=torch.Generator().manual_seed(0))
                        .tolist())

    def epoch(bucket, start=0):
        return [b for b, _ in shuffled(x, 4, torch.Generator().manual_seed(1), start=start,
                                       bucket=bucket)]
    plain, bucketed = epoch(False), epoch(True)
    assert len(plain) == len(bucketed) == 50  # drop_last leaves out the same 3 lines
    assert sorted(torch.cat([b[:, 0] for b in plain]).tolist()) == sorted(
        torch.cat([b[:, 0] for b in bucketed]).tolist())
    spread = [int(lengths(b).max() - lengths(b).min()) for b in bucketed]
    assert max(spread) <= 2 < max(int(lengths(b).max() - lengths(b).min()) for b in plain)
    assert sum(b.numel() for b in bucketed) < 0.7 * sum(b.numel() for b in plain)
    again, resumed = epoch(True), epoch(True, start=7)  # same seed, and mid-epoch
    assert all(torch.equal(a, b) for a, b in zip(again, bucketed, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed, bucketed[7:], strict=True))


def test_bucketing_is_refused_for_images_and_fixed_within_an_epoch(compose_cfg, tmp_path):
    cfg = validate(compose_cfg([*DATA, f"dataset.root={tmp_path}", "dataset.cache=false",
                                "trainer.bucket=true"]))
    with pytest.raises(UserError, match="trainer.bucket=true groups token sequences"):
        setup(cfg, tmp_path / "run")
    ckpt = {"config": {"trainer": {"batch_size": 32}}, "state": {"progress": {"batch": 3}}}
    check_position(ckpt, OmegaConf.create({"trainer": {"batch_size": 32, "bucket": False}}))
    with pytest.raises(UserError, match=r"trainer.bucket=true differs .* \(false\)"):
        check_position(ckpt, OmegaConf.create({"trainer": {"batch_size": 32, "bucket": True}}))


def test_generated_tokens_come_from_the_vocabulary(compose_cfg_module, corpus_file):
    torch.manual_seed(0)
    model, data = _model(compose_cfg_module, corpus_file)
    model = model.model.eval()
    ids = model.generate(torch.randn(32, 3), temperature=1.5)
    assert ids.shape == (32, data.shape[0])
    assert not ((ids == BOS) | (ids < 0) | (ids >= len(data.vocab))).any()
    after_eos = (ids == EOS).long().cumsum(1) > (ids == EOS).long()
    assert (ids[after_eos] == PAD).all()  # nothing after the end of a sentence


def test_homotopy_endpoints_decode_to_the_memorised_lines(compose_cfg_module, tmp_path):
    """A model that memorises four lines must decode the posterior means of two of them
    back to those lines, at both ends of the interpolation."""
    memo = ["the red fox runs", "a small bird sings today", "one tall king waits",
            "every dog sleeps at home"]
    f = write_corpus(tmp_path / "m.txt", memo)
    torch.manual_seed(0)
    model, data = _model(compose_cfg_module, f, f"dataset.val_path={f}",
                         f"dataset.test_path={f}", "model.hidden=64",
                         "model.embed_dim=32", "model.latent_dim=8", "divergence.beta=0.01")
    x = data.vocab.encode(memo, data.shape[0] - 1)[0]
    opt = torch.optim.Adam(model.main_parameters(), 3e-3)
    for step in range(300):
        loss = model(x, step)[0]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = lines(data.vocab, homotopy(model.model, x[[0, 2]], steps=5))
    assert path[0] == memo[0] and path[-1] == memo[2]
    assert all(set(s.split()) <= set(data.vocab.itos) for s in path)


@pytest.mark.parametrize("overrides, fragment", [
    (["model=rnn", "loss=categorical"], "model=rnn reads token sequences"),
    (["dataset=text", "dataset.path=CORPUS", "loss=categorical"], "model=mlp reads images"),
    (["dataset=text", "dataset.path=CORPUS", "model=conv"], "model=conv reads images"),
    (["dataset=text", "dataset.path=CORPUS", "model=rnn", "loss=bernoulli"],
     "need loss=categorical"),
])
def test_sequence_model_and_image_data_do_not_mix(compose_cfg_module, corpus_file, overrides,
                                                  fragment):
    overrides = [o.replace("CORPUS", str(corpus_file)) for o in overrides]
    if "dataset=text" not in overrides:  # tiny shapes
        overrides += ["dataset.n_train=64", "dataset.n_val=8", "dataset.n_test=8",
                      "dataset.cache=false"]
    cfg = validate(compose_cfg_module(overrides))
    data = instantiate("dataset", cfg.dataset)
    with pytest.raises(UserError, match=fragment):
        build_objective(cfg, data.shape, len(data.train),
                    len(data.vocab) if isinstance(data, TextData) else None)


def test_model_rnn_alone_chooses_the_sentence_vae_recipe(compose_cfg_module):
    cfg = compose_cfg_module(["dataset=sentences", "model=rnn"])
    assert cfg.loss._target_.endswith("Categorical")
    assert cfg.schedule._target_.endswith("Logistic") and cfg.model.word_dropout == 0.5
    mine = compose_cfg_module(["dataset=sentences", "model=rnn", "schedule=constant",
                               "model.word_dropout=0"])  # each one override away
    assert mine.schedule._target_.endswith("Constant") and mine.model.word_dropout == 0
    assert compose_cfg_module([]).schedule._target_.endswith("Constant")  # images: as before


# --- the command line (the real dispatcher, in this process) -------------------------------

@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("textcli")
    corpus = write_corpus(tmp / "corpus.txt")
    in_process("train", "dataset=text", f"dataset.path={corpus}", *TINY_RNN,
               "trainer.epochs=2", "trainer.batch_size=8", "trainer.num_images=4",
               "schedule=linear", "schedule.warmup_steps=4", "trainer.bucket=true",
               f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    return tmp / "run", corpus


def test_text_run_writes_text_outputs_and_its_vocabulary(text_run):
    run, _ = text_run
    for name in ["reconstructions.txt", "interpolations.txt", "latent_scatter.png",
                 "images/text_002.txt", "checkpoints/best.pt", "metrics.csv"]:
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoints/best.pt", weights_only=True)
    assert ckpt["vocab"]["itos"][:4] == SPECIALS and ckpt["vocab"]["tokens"] == "word"
    assert "val_ppl" in (run / "metrics.csv").read_text().splitlines()[0]


def test_text_samples_need_no_data_file_and_use_the_training_vocabulary(text_run, tmp_path):
    run, corpus = text_run
    moved = corpus.with_suffix(".away")
    corpus.rename(moved)  # the data file is gone: samples still come from the checkpoint
    try:
        out = in_process("sample", f"ckpt={run / 'checkpoints/best.pt'}", "num_samples=12",
                         "temperature=1.2", f"out_dir={tmp_path}", cwd=tmp_path)
    finally:
        moved.rename(corpus)
    text_out = (tmp_path / "samples_seed0.txt").read_text()
    assert "# greedy" in out.stdout and "# temperature 1.2" in out.stdout
    words = {w for line in CORPUS for w in line.split()} | {"<unk>"}
    drawn = [ln for ln in text_out.splitlines() if ln and not ln.startswith("#")]
    assert len(drawn) == 24
    assert {w for ln in drawn for w in ln.split()} <= words
    assert "samples only" in out.stderr + out.stdout


def test_a_fitted_sampler_draws_text_and_no_frechet_score(text_run, compose_cfg, tmp_path):
    from vae_cli.commands import sample

    run, _ = text_run
    args = [f"ckpt={run / 'checkpoints/best.pt'}", "sampler=gmm", "sampler.components=2",
            "num_samples=3", "pictures=false", f"out_dir={tmp_path}"]
    sample.run(compose_cfg(args, name="sample"))
    lines = (tmp_path / "samples_gmm_seed0.txt").read_text().splitlines()
    assert lines[0] == "# greedy" and (tmp_path / "samplers/gmm_best.pt").is_file()
    with pytest.raises(UserError, match="scores images"):
        sample.run(compose_cfg([*args, "fd.samples=8"], name="sample"))


def test_text_eval_reports_perplexity_kl_and_active_units(text_run):
    run, _ = text_run
    out = in_process("eval", f"ckpt={run / 'checkpoints/best.pt'}", "eval.iw_samples=16",
                     cwd=run.parent)
    result = json.loads((run / "eval.json").read_text())
    for key in ["nll_iwae", "ppl_iwae", "nll_token_iwae", "ppl", "kl_per_dim", "active_units"]:
        assert key in result and key in out.stdout, key
    assert result["nll_iwae"] <= result["nelbo_iw"]
    assert result["ppl_iwae"] == pytest.approx(math.exp(result["nll_token_iwae"]))
    assert 1 < result["ppl_iwae"] < 13  # uniform over the 9 words and 4 specials: 13
