"""The engine: tail coverage, batching across studies, masking of missing modalities, precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.bundle import load_bundle, make_demo_bundle
from inference.engine import Engine, EngineOptions, InputError, check_duration, plan_windows
from inference.results import StudyInput


@pytest.fixture(scope="module")
def demo_bundle_dir(tmp_path_factory):
    return make_demo_bundle(tmp_path_factory.mktemp("bundles") / "demo")


@pytest.fixture(scope="module")
def engine(demo_bundle_dir):
    return Engine.from_bundle_dir(demo_bundle_dir, EngineOptions(device="cpu"))


def _night(n_tokens, channels=None, seed=0):
    channels = channels or {"BAS": 3, "RESP": 2, "EKG": 1, "EMG": 2}
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((c, n_tokens * 640), dtype=np.float32) for m, c in channels.items()}


@pytest.mark.parametrize("n_tokens", [1, 59, 60, 61, 119, 120, 197, 5760 + 17])
def test_plan_covers_every_token_once(n_tokens):
    covered = np.zeros(n_tokens, dtype=int)
    plan = plan_windows(n_tokens)
    for start, length, keep in plan:
        assert start >= 0 and start + length <= n_tokens
        assert length == min(60, n_tokens)
        covered[start + keep : start + length] += 1
    assert (covered == 1).all()
    assert len(plan) == -(-n_tokens // 60)


def test_token_count_is_floor_of_duration(engine):
    # 16 min 27.3 s of signal: 197 whole 5-s tokens; the last 2.3 s are not a token.
    n_samples = 197 * 640 + 294
    signals = {m: a[:, :n_samples] for m, a in _night(198).items()}
    result = engine.run(StudyInput(signals))
    assert result.n_tokens == 197
    for m in result.modalities:
        assert result.token_embeddings[m].shape == (197, 128)
        assert result.token_embeddings[m].dtype == np.float32
        assert result.window_embeddings[m].shape == (4, 128)
    assert np.isfinite(np.stack(list(result.token_embeddings.values()))).all()


def test_tail_tokens_come_from_an_end_aligned_window(engine):
    signals = _night(197)
    result = engine.run(StudyInput(signals))
    encoder = engine.bundle.encoder
    with torch.inference_mode():
        for m in ("BAS", "EKG"):
            x = torch.from_numpy(signals[m][:, (197 - 60) * 640 :])[None]
            pooled, tokens = encoder(x, torch.zeros(1, x.shape[1], dtype=torch.bool))
            np.testing.assert_allclose(result.token_embeddings[m][-17:], tokens[0, -17:].numpy(), atol=1e-5)
            np.testing.assert_allclose(result.window_embeddings[m][-1], pooled[0].numpy(), atol=1e-5)
            x = torch.from_numpy(signals[m][:, 60 * 640 : 120 * 640])[None]
            pooled, tokens = encoder(x, torch.zeros(1, x.shape[1], dtype=torch.bool))
            np.testing.assert_allclose(result.token_embeddings[m][60:120], tokens[0].numpy(), atol=1e-5)


def test_batching_across_studies_and_batch_size_do_not_change_results(demo_bundle_dir):
    studies = [StudyInput(_night(130, seed=1), 55, "M", "a"),
               StudyInput(_night(61, {"BAS": 4, "RESP": 1}, seed=2), 40, "F", "b"),
               StudyInput(_night(30, {"EKG": 1}, seed=3), None, None, "c")]
    small = Engine(load_bundle(demo_bundle_dir), EngineOptions(windows_per_batch=1))
    large = Engine(load_bundle(demo_bundle_dir), EngineOptions(windows_per_batch=32))
    together = large.run_many(studies)
    for study, joint in zip(studies, together):
        alone = small.run(study)
        assert joint.key == study.key
        for m in alone.modalities:
            np.testing.assert_allclose(joint.token_embeddings[m], alone.token_embeddings[m], atol=1e-4)
        np.testing.assert_allclose(joint.hazards.log_hazard, alone.hazards.log_hazard, atol=1e-4)
        np.testing.assert_allclose(joint.staging.token_probs, alone.staging.token_probs, atol=1e-4)


def test_missing_modality_is_masked_and_reported(engine):
    full = _night(120)
    partial = {m: a for m, a in full.items() if m != "EMG"}
    result = engine.run(StudyInput(partial, 60, "F"))
    assert result.missing_modalities == ["EMG"]
    assert result.modalities == ["BAS", "RESP", "EKG"]
    assert np.isnan(result.night_vector[3 * 128 :]).all()
    assert np.isfinite(result.night_vector[: 3 * 128]).all()
    assert result.hazards.log_hazard.shape == (1065,)
    assert np.isfinite(result.hazards.log_hazard).all()
    # Masking is not the same as a zero signal: the heads really ignore the missing modality.
    zeros = dict(partial, EMG=np.zeros_like(full["EMG"]))
    with_zeros = engine.run(StudyInput(zeros, 60, "F"))
    assert not np.allclose(with_zeros.hazards.log_hazard, result.hazards.log_hazard)


def test_night_vector_is_mean_of_whole_window_embeddings(engine):
    result = engine.run(StudyInput(_night(130)))
    # two whole windows and the end-aligned tail window, which overlaps the second and stays out
    assert all(len(result.window_embeddings[m]) == 3 for m in result.modalities)
    for i, m in enumerate(("BAS", "RESP", "EKG", "EMG")):
        np.testing.assert_allclose(
            result.night_vector[i * 128 : (i + 1) * 128], result.window_embeddings[m][:2].mean(axis=0), rtol=1e-6
        )
        assert not np.allclose(result.night_vector[i * 128 : (i + 1) * 128],
                               result.window_embeddings[m].mean(axis=0), rtol=1e-6)


def test_demographics_change_hazards_and_are_recorded(engine):
    signals = _night(60)
    young = engine.run(StudyInput(signals, 30, "F"))
    old = engine.run(StudyInput(signals, 80, "M"))
    assert not np.allclose(young.hazards.log_hazard, old.hazards.log_hazard)
    assert old.demographics_used["age_feature"] == pytest.approx(1.5)
    assert old.demographics_used["sex_feature"] == 1.0
    np.testing.assert_array_equal(young.token_embeddings["BAS"], old.token_embeddings["BAS"])


def test_outputs_identify_the_bundle(engine):
    result = engine.run(StudyInput(_night(12)))
    assert result.validated is False
    assert result.bundle.name == "sleepfm-demo-untrained"
    assert set(result.bundle.checkpoints) == {"base", "staging", "diagnosis"}
    assert all(len(h) == 64 for h in result.bundle.checkpoints.values())
    assert result.hazards.outcomes[0].phecode == "8.0"


def test_bad_inputs_are_clear_errors(engine):
    with pytest.raises(InputError, match="no mapped channel"):
        engine.run(StudyInput({}, key="s1"))
    with pytest.raises(InputError, match="no mapped channel"):
        engine.run(StudyInput({"BAS": np.zeros((0, 6400), np.float32)}))
    with pytest.raises(InputError, match="unknown modalities"):
        engine.run(StudyInput({"EEG": np.zeros((1, 6400), np.float32)}))
    with pytest.raises(InputError, match="differ in length"):
        engine.run(StudyInput({"BAS": np.zeros((1, 6400), np.float32), "EKG": np.zeros((1, 7040), np.float32)}))
    with pytest.raises(InputError, match=r"study 0: recording shorter than one 30-s epoch \(4\.9 s\)"):
        engine.run(StudyInput({"BAS": np.zeros((1, 639), np.float32)}))
    bad = np.zeros((1, 6400), np.float32)
    bad[0, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        engine.run(StudyInput({"BAS": bad}))


def test_bf16_stays_close_to_fp32(demo_bundle_dir):
    signals = _night(90)
    fp32 = Engine(load_bundle(demo_bundle_dir), EngineOptions(precision="fp32")).run(StudyInput(signals, 50, "M"))
    bf16 = Engine(load_bundle(demo_bundle_dir), EngineOptions(precision="bf16")).run(StudyInput(signals, 50, "M"))
    assert bf16.precision == "bf16"
    for m in fp32.modalities:
        a, b = fp32.token_embeddings[m], bf16.token_embeddings[m]
        assert b.dtype == np.float32
        # bf16 keeps ~3 significant digits; embeddings are O(1) after the final layer norms.
        assert np.abs(a - b).max() < 0.25
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_option_errors():
    with pytest.raises(ValueError, match="precision"):
        Engine.__init__(object.__new__(Engine), None, EngineOptions(precision="int8"))
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        Engine.__init__(object.__new__(Engine), None, EngineOptions(device="cpu", precision="fp16"))


def test_nights_longer_than_the_staging_table_are_staged_in_equal_segments(demo_bundle_dir):
    import dataclasses

    from inference.models import StagingHead

    bundle = load_bundle(demo_bundle_dir)
    short = StagingHead(dataclasses.replace(bundle.staging.cfg, max_seq_length=64)).eval()
    weights = {k: v for k, v in bundle.staging.state_dict().items() if k != "positional_encoding.pe"}
    short.load_state_dict(weights, strict=False)
    bundle.staging = short
    engine = Engine(bundle, EngineOptions())
    signals = _night(130)
    result = engine.run(StudyInput(signals))
    probs = result.staging.token_probs
    assert probs.shape == (130, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # 130 tokens with a 64-token table: the 120 tokens of the whole windows in two segments of 60, each
    # staged on its own, and the 10-token tail as a segment of its own.
    tokens = torch.stack([torch.from_numpy(result.token_embeddings[m]) for m in ("BAS", "RESP", "EKG", "EMG")])
    with torch.inference_mode():
        first = torch.softmax(short(tokens[None, :, :60]), dim=-1)[0].numpy()
        second = torch.softmax(short(tokens[None, :, 60:120]), dim=-1)[0].numpy()
        tail = torch.softmax(short(tokens[None, :, 120:]), dim=-1)[0].numpy()
    np.testing.assert_allclose(probs[:60], first, atol=1e-5)
    np.testing.assert_allclose(probs[60:120], second, atol=1e-5)
    np.testing.assert_allclose(probs[120:], tail, atol=1e-5)


def test_bf16_on_a_cpu_without_native_bf16_warns(demo_bundle_dir, monkeypatch):
    import inference.engine as eng

    monkeypatch.setattr(eng, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        Engine(load_bundle(demo_bundle_dir), EngineOptions(device="cpu", precision="bf16"))
    monkeypatch.setattr(eng, "cpu_has_native_bf16", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(load_bundle(demo_bundle_dir), EngineOptions(device="cpu", precision="bf16"))


def _with_short_tables(bundle_dir, staging: int | None = None, diagnosis: int | None = None):
    """The demo bundle with shorter positional tables (the weights are otherwise the same)."""
    import dataclasses

    from inference.models import DiagnosisHead, StagingHead

    bundle = load_bundle(bundle_dir)
    for name, cls, length in (("staging", StagingHead, staging), ("diagnosis", DiagnosisHead, diagnosis)):
        if length is None:
            continue
        head = getattr(bundle, name)
        short = cls(dataclasses.replace(head.cfg, max_seq_length=length)).eval()
        weights = {k: v for k, v in head.state_dict().items() if k != "positional_encoding.pe"}
        short.load_state_dict(weights, strict=False)
        setattr(bundle, name, short)
    return bundle


def test_tail_changes_neither_whole_night_staging_nor_hazards(engine):
    """The release drops the partial last window: its staging and hazards of the whole windows must be
    what we report, whatever the tail holds; the tail is staged on its own and marked."""
    signals = _night(130)
    full = engine.run(StudyInput(signals, 60, "F"))
    whole = engine.run(StudyInput({m: a[:, : 120 * 640] for m, a in signals.items()}, 60, "F"))
    assert (full.tail_start, full.tail_tokens, full.diagnosis_tokens) == (120, 10, 120)
    assert (whole.tail_start, whole.tail_tokens) == (120, 0)
    np.testing.assert_allclose(full.staging.token_probs[:120], whole.staging.token_probs, atol=1e-6)
    np.testing.assert_allclose(full.hazards.log_hazard, whole.hazards.log_hazard, atol=1e-6)
    np.testing.assert_allclose(full.night_vector, whole.night_vector, atol=1e-6)
    # the tail's own segment: the head over the tail tokens alone
    tokens = torch.stack([torch.from_numpy(full.token_embeddings[m]) for m in ("BAS", "RESP", "EKG", "EMG")])
    with torch.inference_mode():
        tail = torch.softmax(engine.bundle.staging(tokens[None, :, 120:]), dim=-1)[0].numpy()
    np.testing.assert_allclose(full.staging.token_probs[120:], tail, atol=1e-5)
    # 130 tokens = 21 whole epochs (the last 4 tokens are no epoch); epochs 20.. are the tail's
    assert full.staging.tail_start_epoch == 20
    assert [full.staging.is_tail(e) for e in (19, 20)] == [False, True]
    assert whole.staging.tail_start_epoch is None


def test_a_different_tail_leaves_the_whole_windows_results_alone(engine):
    a, b = _night(130, seed=1), _night(130, seed=2)
    mixed = {m: np.concatenate([a[m][:, : 120 * 640], b[m][:, 120 * 640 :]], axis=1) for m in a}
    one, two = engine.run(StudyInput(a, 50, "M")), engine.run(StudyInput(mixed, 50, "M"))
    np.testing.assert_allclose(one.hazards.log_hazard, two.hazards.log_hazard, atol=1e-6)
    np.testing.assert_allclose(one.staging.token_probs[:120], two.staging.token_probs[:120], atol=1e-6)
    assert not np.allclose(one.staging.token_probs[120:], two.staging.token_probs[120:], atol=1e-4)


@pytest.mark.parametrize(("n_samples", "shown"), [(1, "0.0"), (5 * 640, "25.0"), (6 * 640 - 1, "29.9")])
def test_shorter_than_one_epoch_is_an_input_error(engine, n_samples, shown):
    """Under six 5-s tokens there is no 30-s epoch to stage: refused up front (it used to fail in the
    hypnogram's reshape), the duration rounded down so that it never reads 30.0 s."""
    signals = {m: a[:, :n_samples] for m, a in _night(6).items()}
    with pytest.raises(InputError) as info:
        engine.run(StudyInput(signals, key="k1"))
    assert str(info.value) == f"study k1: recording shorter than one 30-s epoch ({shown} s)"


def test_one_epoch_is_enough(engine):
    """Exactly 30 s: one epoch, staged and given hazards from the one short window."""
    result = engine.run(StudyInput(_night(6)))
    assert result.n_tokens == 6 and len(result.staging.hypnogram) == 1
    assert result.diagnosis_tokens == 6 and np.isfinite(result.hazards.log_hazard).all()


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan"), 29.97])
def test_check_duration_refuses_under_30_s(duration):
    with pytest.raises(InputError, match="recording shorter than one 30-s epoch"):
        check_duration(duration)
    check_duration(30.0)  # and takes one epoch


def test_short_night_is_its_own_window_without_tail(engine):
    result = engine.run(StudyInput(_night(45)))
    assert (result.tail_start, result.tail_tokens, result.diagnosis_tokens) == (45, 0, 45)
    assert result.staging.tail_start_epoch is None


def test_diagnosis_head_gets_the_first_tokens_up_to_its_table(demo_bundle_dir):
    """The release feeds its diagnosis head at most max_seq_length (6480) tokens: the rest of a long
    night is cut, and the hazards equal those of the night cut there."""
    bundle = _with_short_tables(demo_bundle_dir, diagnosis=120)
    engine = Engine(bundle, EngineOptions())
    signals = _night(190)
    long = engine.run(StudyInput(signals, 40, "M"))
    cut = engine.run(StudyInput({m: a[:, : 120 * 640] for m, a in signals.items()}, 40, "M"))
    assert (long.tail_start, long.diagnosis_tokens) == (180, 120)
    np.testing.assert_allclose(long.hazards.log_hazard, cut.hazards.log_hazard, atol=1e-6)
    assert long.staging.token_probs.shape == (190, 5)  # staging still covers the whole night


def test_demographics_encoding_is_named_or_unconfirmed(demo_bundle_dir, tmp_path):
    import json
    import shutil

    declared = Engine(load_bundle(demo_bundle_dir)).run(StudyInput(_night(60), 50, "M"))
    assert declared.demographics_encoding == "psg-gateway demo (age-50)/20"
    bare = tmp_path / "bare"
    shutil.copytree(demo_bundle_dir, bare)
    meta = json.loads((bare / "bundle.json").read_text())
    del meta["demographics"]
    (bare / "bundle.json").write_text(json.dumps(meta))
    unconfirmed = Engine(load_bundle(bare)).run(StudyInput(_night(60), 50, "M"))
    assert unconfirmed.demographics_encoding == "unconfirmed"
    # the features are the default guess either way
    assert unconfirmed.demographics_used["age_feature"] == declared.demographics_used["age_feature"] == 0.0
    meta["demographics"] = {"age_center": 0.0, "age_scale": 100.0}
    (bare / "bundle.json").write_text(json.dumps(meta))
    unnamed = Engine(load_bundle(bare)).run(StudyInput(_night(60), 50, "M"))
    assert unnamed.demographics_encoding.startswith("age (0-centred, /100)")
    assert unnamed.demographics_used["age_feature"] == pytest.approx(0.5)


def test_the_thread_count_holds_in_the_thread_that_runs_the_engine(demo_bundle_dir):
    """torch keeps a thread count per thread: an engine made in one thread (infer's loader, the daemon's
    start) and run in another (a pipeline worker) uses its own count there, not that thread's."""
    import threading

    import torch

    made: list[Engine] = []
    maker = threading.Thread(target=lambda: made.append(
        Engine.from_bundle_dir(demo_bundle_dir, EngineOptions(device="cpu", threads=1))))
    maker.start()
    maker.join()
    seen: list[int] = []

    def worker() -> None:
        torch.set_num_threads(2)  # this thread's own count before the engine runs in it
        made[0].run(StudyInput(_night(12)))
        seen.append(torch.get_num_threads())

    runner = threading.Thread(target=worker)
    runner.start()
    runner.join()
    assert seen == [1]


def test_the_heads_lstm_runs_on_one_thread_and_gives_the_same_numbers(demo_bundle_dir):
    """Each LSTM step is too small to share between threads, and with sleeping OpenMP threads
    (the command line's OMP_WAIT_POLICY=PASSIVE) every step's hand-over woke one: a night's heads took
    ~10 s instead of ~1 s on 2 cores. At inference the LSTMs run on one thread; the engine's count
    is back afterwards and the numbers are those of the LSTM on the engine's threads."""
    engine = Engine.from_bundle_dir(demo_bundle_dir, EngineOptions(device="cpu", threads=2))
    lstms = [engine.bundle.staging.lstm, engine.bundle.diagnosis.lstm]
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads())) for m in lstms]
    try:
        result = engine.run(StudyInput(_night(130), 50, "F"))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2

    from inference import models

    with torch.inference_mode():  # the same LSTM on two threads, outside the helper
        x = torch.randn(1, 130, 128)
        torch.set_num_threads(2)
        shared, _ = engine.bundle.diagnosis.lstm(x)
        single, _ = models._lstm_fp32(engine.bundle.diagnosis.lstm, x)
    torch.testing.assert_close(single, shared, rtol=0, atol=1e-6)
    assert np.isfinite(result.hazards.log_hazard).all()


def test_one_cpu_thread_restores_the_count_after_an_error():
    from inference.models import one_cpu_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError), one_cpu_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_training_lstm_keeps_its_threads(demo_bundle_dir):
    """Refitting a head trains its LSTM on batches with gradients: that keeps the engine's threads."""
    from inference import models

    lstm = load_bundle(demo_bundle_dir).staging.lstm.train()
    seen: list[int] = []
    hook = lstm.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models._lstm_fp32(lstm, torch.randn(2, 12, 128))
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert seen == [2]
