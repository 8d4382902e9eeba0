"""The signal-quality gate (inference/quality.py) and its wiring: a flat, a clipped, a disconnected and a
mains-swamped channel are caught with the right problem code, clean nights (the project's synthetic
nights, the real Sleep-EDF excerpt) pass, a modality left without a usable channel makes the study
uninterpretable, and the verdict reaches ReadyStudy, metrics.json, the batch's jobs, the daemon's
pipeline and ``psg-gateway infer --config``."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pipeline_env import pipeline_env, spool_file
from typer.testing import CliRunner

from gateway.config import GatewayConfig, QualityConfig
from gateway.montage.table import default_table
from gateway.pipeline.prepare import prepare_study
from gateway.pipeline.steps import infer_ready, outputs_extra, store_outputs
from gateway.readers import read_recording
from gateway.readers.edf import read_edf
from gateway.recording import Channel, Recording
from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS, SyntheticChannel, write_synthetic_night
from inference.quality import QualityThresholds, assess_channel, assess_study, microvolts_per_unit

MINUTES = 20  # the in-memory nights: forty 30-s epochs
GENERATED_BY = {c.label: c for c in DEFAULT_BENCH_CHANNELS}


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """A 20-minute synthetic night from the project's generator (all 18 bench channels)."""
    return write_synthetic_night(tmp_path_factory.mktemp("night") / "night.edf", hours=MINUTES / 60, seed=17)


@pytest.fixture(scope="module")
def recorded(night) -> dict[str, Channel]:
    """The generated night's channels, read back and held in memory (each ``read()`` is a fresh copy)."""
    recording = read_edf(night)
    return {c.label: Channel.from_array(c.label, c.sampling_rate, c.read(), c.unit,
                                        physical_range=c.physical_range) for c in recording.channels}


def _recording(*channels: Channel, seconds: float = MINUTES * 60) -> Recording:
    return Recording(channels=list(channels), duration_s=seconds)


def _with_samples(channel: Channel, samples: np.ndarray, *, valid: np.ndarray | None = None,
                  label: str | None = None, unit: str | None = None) -> Channel:
    return Channel.from_array(label or channel.label, channel.sampling_rate, samples,
                              channel.unit if unit is None else unit, valid=valid,
                              physical_range=channel.physical_range)


def _mains(channel: Channel, hz: float, amplitude_uv: float) -> Channel:
    t = np.arange(channel.n_samples) / channel.sampling_rate
    return _with_samples(channel, channel.read() + amplitude_uv * np.sin(2 * np.pi * hz * t))


# ---- clean nights pass ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "hours", "seed"), [(".edf", 0.3, 11), (".bdf", 0.1, 12), (".edf", 0.01, 13)])
def test_clean_synthetic_nights_are_interpretable_with_every_channel_usable(tmp_path, suffix, hours, seed):
    night = write_synthetic_night(tmp_path / f"n{suffix}", hours=hours, seed=seed)
    ready = prepare_study(read_recording(night), default_table())
    quality = ready.quality
    assert quality is not None and quality.interpretable, quality.reasons
    assert quality.reasons == [] and quality.warnings == []
    assert {label: c.problems for label, c in quality.channels.items() if c.problems} == {}
    assert quality.modalities == {"BAS": {"usable": 8, "channels": 8}, "RESP": {"usable": 6, "channels": 6},
                                  "EKG": {"usable": 1, "channels": 1}, "EMG": {"usable": 3, "channels": 3}}
    eeg, spo2, flow = quality.channels["C3-M2"], quality.channels["SpO2"], quality.channels["Airflow"]
    # measured, not skipped: the physical range came from the header, mains bands fit in 256 Hz sampling
    assert eeg.clipped_fraction == 0.0 and eeg.flat_fraction == 0.0
    assert eeg.line_noise_ratio is not None and eeg.line_noise_ratio < 0.1
    assert 5 < eeg.amplitude_uv < 100 and eeg.typical_epoch_sd > 0.5
    assert flow.line_noise_ratio is None and any("32 Hz sampling" in n for n in flow.notes)
    assert spo2.clipped_fraction is None and spo2.amplitude_uv is None  # an oximeter trend in %
    assert set(ready.timings_s) == {"read", "preprocess", "quality"}


def test_the_real_sleep_edf_excerpt_is_interpretable(reference_dir):
    for name in ("short_psg.edf", "short_psg.bdf"):
        quality = prepare_study(read_recording(reference_dir / "real" / name), default_table()).quality
        assert quality.interpretable and not quality.warnings, (name, quality.warnings)
        eeg, emg = quality.channels["EEG Fpz-Cz"], quality.channels["EMG submental"]
        # 100 Hz sampling: no content at 50/60 Hz; the 1-Hz chin EMG is an RMS envelope, not judged
        assert eeg.line_noise_ratio is None and any("needs more than 102 Hz" in n for n in eeg.notes)
        assert emg.amplitude_uv is not None and any("1 Hz is below 50 Hz" in n for n in emg.notes)
        assert eeg.clipped_fraction == 0.0  # the header's physical range was used


# ---- each fault is caught with its code ------------------------------------------------------------------------


def test_flat_channel_is_caught_and_its_modality_keeps_the_clean_one(recorded):
    c3, c4 = recorded["C3-M2"], recorded["C4-M1"]
    flat = _with_samples(c3, np.full(c3.n_samples, 12.5, np.float32))
    ready = prepare_study(_recording(flat, c4), default_table())
    quality = ready.quality
    assert quality.channels["C3-M2"].problems == ["flat"]
    assert quality.channels["C3-M2"].flat_fraction == 1.0 and not quality.channels["C3-M2"].usable
    assert quality.channels["C4-M1"].usable
    assert quality.interpretable  # BAS still has C4-M1; one of two channels unusable is not more than half
    assert quality.modalities == {"BAS": {"usable": 1, "channels": 2}}
    assert quality.warnings == ["C3-M2 (BAS): flat line in 100 % of its epochs"]


def test_clipped_channel_written_to_an_edf_is_caught_through_the_header_range(tmp_path):
    # The generator clips every value to the channel's physical range: an EEG recorded with a +/-20 µV
    # range spends much of the night at the digital limits.
    narrow = SyntheticChannel("C3-M2", 256, "eeg", physical_min=-20.0, physical_max=20.0)
    path = write_synthetic_night(tmp_path / "clipped.edf", hours=MINUTES / 60, seed=5,
                                 channels=[narrow, GENERATED_BY["C4-M1"], GENERATED_BY["ECG II"]])
    recording = read_edf(path)
    assert recording.channels[0].physical_range == (-20.0, 20.0)
    assert recording.detached().channels[0].physical_range == (-20.0, 20.0)  # metadata, kept when detached
    quality = prepare_study(recording, default_table()).quality
    c3 = quality.channels["C3-M2"]
    assert c3.problems == ["clipped"] and c3.clipped_fraction > 0.9
    assert quality.channels["C4-M1"].usable and quality.channels["ECG II"].usable
    assert quality.interpretable
    # the same samples without a known range: saturation is not judged (and said so)
    samples = recording.channels[0].read()
    unknown = assess_channel("C3-M2", "BAS", samples, 256.0, unit="uV")
    assert unknown.clipped_fraction is None and "clipped" not in unknown.problems
    assert "saturation not judged: physical range unknown" in unknown.notes


def test_the_raw_reader_gives_the_physical_range_too(tmp_path):
    from test_edf_discontinuous import Sig, edf_bytes, ramp, record_tals

    onsets = [0.0, 1.0, 3.0, 4.5]  # EDF+D: read by the raw reader, with gaps
    signals = [Sig("EEG C3-A2", 8, pmin=250, pmax=-250), Sig("SpO2", 2, pmin=5, pmax=5, unit="%")]
    path = tmp_path / "d.edf"
    path.write_bytes(edf_bytes(signals, [ramp(4, 8, 100), ramp(4, 2, -50)],
                               tals=[record_tals(t) for t in onsets], reserved="EDF+D"))
    recording = read_edf(path)
    assert recording.channels[0].has_gaps and recording.channels[0].physical_range == (-250.0, 250.0)
    assert recording.channels[1].physical_range is None  # physical min == max: read as a constant


def test_disconnected_channel_constant_for_over_an_hour_is_caught():
    rate, hours = 64.0, 5.0
    n = int(rate * 3600 * hours)
    rng = np.random.default_rng(3)
    c3 = rng.standard_normal(n).astype(np.float32) * 20
    c3[int(rate * 7200): int(rate * (7200 + 4200))] = 0.0  # 70 min without signal, 23 % of the night
    c4 = rng.standard_normal(n).astype(np.float32) * 20
    rec = _recording(Channel.from_array("C3-M2", rate, c3), Channel.from_array("C4-M1", rate, c4),
                     seconds=hours * 3600)
    quality = prepare_study(rec, default_table()).quality
    c3q = quality.channels["C3-M2"]
    assert c3q.problems == ["disconnected"]  # not flat: 23 % of its epochs is under flat_max_fraction
    assert c3q.longest_dropout_s == pytest.approx(4200, abs=60) and c3q.flat_fraction < 0.25
    assert quality.channels["C4-M1"].usable
    assert "no signal for 70 min in a row" in quality.warnings[0]


def test_disconnected_as_a_long_gap_and_gaps_past_their_share(recorded):
    c3, c4 = recorded["C3-M2"], recorded["C4-M1"]
    rate = c3.sampling_rate
    valid = np.ones(c3.n_samples, bool)
    valid[int(rate * 120): int(rate * (120 + 8 * 60))] = False  # 8 minutes of a 20-minute night
    samples = c3.read()
    samples[~valid] = 0.0  # as readers fill a gap
    gapped = _with_samples(c3, samples, valid=valid)
    thresholds = QualityThresholds(disconnected_min_seconds=300)
    ready = prepare_study(_recording(gapped, c4), default_table(), quality=thresholds)
    c3q = ready.quality.channels["C3-M2"]
    assert c3q.problems == ["disconnected", "gaps"]
    assert c3q.gap_fraction == pytest.approx(0.4, abs=1e-3) and c3q.longest_dropout_s >= 8 * 60
    assert ready.gap_fraction["C3-M2"] == pytest.approx(0.4, abs=0.01)  # the preprocessing's own figure
    # under the default one-hour rule and a gap share below the default 25 %, a 4-minute gap is fine
    valid[int(rate * 360): int(rate * (120 + 8 * 60))] = True
    samples = c3.read()
    samples[~valid] = 0.0
    short = assess_channel("C3-M2", "BAS", samples, rate, unit="uV", valid=valid)
    assert short.problems == [] and short.gap_fraction == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("hz", [60.0, 50.0])
def test_mains_swamped_eeg_is_caught_with_its_frequency(recorded, hz):
    c3, c4 = recorded["C3-M2"], recorded["C4-M1"]
    ready = prepare_study(_recording(_mains(c3, hz, 80.0), _mains(c4, hz, 1.0)), default_table())
    swamped, touched = ready.quality.channels["C3-M2"], ready.quality.channels["C4-M1"]
    assert swamped.problems == ["line_noise"]
    assert swamped.line_noise_hz == hz and swamped.line_noise_ratio > 0.9
    assert touched.usable and touched.line_noise_ratio < 0.3  # a little mains is no problem
    assert f"{hz:g} Hz mains interference" in ready.quality.warnings[0]


@pytest.mark.parametrize(("rate", "hz"), [(128.0, 60.0), (110.0, 50.0)])
def test_mains_bands_need_the_sampling_rate(rate, hz):
    rng = np.random.default_rng(1)
    t = np.arange(int(rate * 600)) / rate
    eeg = (rng.standard_normal(t.size) * 5 + 80 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    swamped = assess_channel("C3-M2", "BAS", eeg, rate, unit="uV")
    assert swamped.problems == ["line_noise"] and swamped.line_noise_hz == hz
    # 110 Hz sampling has content up to 55 Hz: the 50-Hz band only, and a note says so
    assert any("measured at 50 Hz only" in n for n in swamped.notes) == (rate < 122)
    at_100 = assess_channel("C3-M2", "BAS", eeg[: int(rate * 300)], 100.0, unit="uV")
    assert at_100.line_noise_ratio is None and "line_noise" not in at_100.problems


@pytest.mark.parametrize(("unit", "scale", "code"), [("uV", 1e-6, "amplitude_low"), ("V", 1.0, "amplitude_high"),
                                                     ("mV", 1.0, "amplitude_high"), ("mV", 1e-3, None)])
def test_amplitude_is_judged_in_microvolts(recorded, unit, scale, code):
    # an EEG in µV numbers with the unit (or the gain) wrong
    c3 = recorded["C3-M2"]
    checked = assess_channel("C3-M2", "BAS", c3.read() * scale, c3.sampling_rate, unit=unit)
    assert checked.problems == ([code] if code else [])
    assert checked.amplitude_uv == pytest.approx(checked.amplitude * microvolts_per_unit(unit))


def test_amplitude_is_not_judged_without_a_voltage_unit(recorded):
    flow = recorded["Nasal Pressure"]  # cmH2O
    checked = assess_channel(flow.label, "RESP", flow.read() * 1e6, flow.sampling_rate, unit=flow.unit)
    assert checked.usable and checked.amplitude_uv is None
    assert "amplitude not judged: unit 'cmH2O' is not a voltage" in checked.notes


def test_artifacts_that_set_the_scale_are_seen_on_the_128_hz_row(recorded):
    c3 = recorded["C3-M2"]
    samples = c3.read()
    samples[: int(c3.sampling_rate * 90)] *= 400  # three epochs of a railing electrode, 400x the EEG
    ready = prepare_study(_recording(_with_samples(c3, samples, unit="uV")), default_table(),
                          quality=QualityThresholds(amplitude_uv={"BAS": (None, None)}))
    c3q = ready.quality.channels["C3-M2"]
    assert c3q.problems == ["artifact_dominated"] and c3q.typical_epoch_sd < 0.05
    # snore and EMG burst by nature: not judged by that rule
    snore = recorded["Snore"]
    burst = snore.read()
    burst[: int(snore.sampling_rate * 90)] *= 400
    ready = prepare_study(_recording(_with_samples(snore, burst)), default_table())
    assert ready.quality.channels["Snore"].typical_epoch_sd < 0.05 and ready.quality.channels["Snore"].usable


def test_oximeter_trend_holding_a_value_is_not_flat(recorded):
    spo2 = recorded["SpO2"]
    steady = np.round(spo2.read())  # integer percent: one value for many epochs
    steady[: steady.size // 2] = 97.0
    held = assess_channel("SpO2", "RESP", steady, spo2.sampling_rate, unit="%", physical_range=(0.0, 100.0))
    assert held.usable and held.flat_fraction >= 0.5
    off = assess_channel("SpO2", "RESP", np.zeros(spo2.n_samples), spo2.sampling_rate, unit="%")
    assert off.problems == ["flat"]


# ---- the study verdict -----------------------------------------------------------------------------------------


def test_a_modality_whose_only_channel_is_bad_makes_the_study_uninterpretable(recorded):
    ecg = recorded["ECG II"]
    dead_ecg = _with_samples(ecg, np.zeros(ecg.n_samples, np.float32))
    rec = _recording(recorded["C3-M2"], recorded["C4-M1"], recorded["Thor"], dead_ecg, recorded["Chin1-Chin2"])
    quality = prepare_study(rec, default_table()).quality
    assert not quality.interpretable
    assert quality.reasons == ["EKG has no usable channel: ECG II (flat)"]
    assert quality.modalities["EKG"] == {"usable": 0, "channels": 1}
    assert quality.modalities["BAS"] == {"usable": 2, "channels": 2}


def test_more_than_half_of_the_channels_unusable_makes_the_study_uninterpretable(recorded):
    flat = [_with_samples(recorded[label], np.zeros(recorded[label].n_samples, np.float32))
            for label in ("F3-M2", "F4-M1", "C3-M2")]
    quality = prepare_study(_recording(*flat, recorded["C4-M1"]), default_table()).quality
    assert quality.modalities == {"BAS": {"usable": 1, "channels": 4}}
    assert quality.reasons == ["3 of 4 mapped channels are unusable (more than 50 %): F3-M2, F4-M1, C3-M2"]
    relaxed = assess_study(quality.channels.values(), QualityThresholds(max_unusable_fraction=0.75))
    assert relaxed.interpretable and len(relaxed.warnings) == 3


def test_a_dropped_channel_is_mapped_and_unusable(recorded):
    c3, c4 = recorded["C3-M2"], recorded["C4-M1"]
    dead = _with_samples(c3, np.zeros(c3.n_samples, np.float32), valid=np.zeros(c3.n_samples, bool))
    ready = prepare_study(_recording(dead, c4), default_table())
    assert ready.channels == {"BAS": ["C4-M1"]} and "C3-M2" in ready.dropped
    c3q = ready.quality.channels["C3-M2"]
    assert c3q.problems == ["gaps", "dropped"] and c3q.gap_fraction == 1.0
    assert any(n.startswith("dropped: ") for n in c3q.notes)
    assert ready.quality.interpretable  # C4-M1 carries BAS


def test_duplicate_labels_are_kept_apart(recorded):
    c3 = recorded["C3-M2"]
    flat = _with_samples(c3, np.zeros(c3.n_samples, np.float32))
    quality = prepare_study(_recording(c3, flat), default_table()).quality
    assert list(quality.channels) == ["C3-M2", "C3-M2 #2"]
    assert quality.channels["C3-M2"].usable and quality.channels["C3-M2 #2"].problems == ["flat"]


# ---- where the verdict goes ------------------------------------------------------------------------------------


def test_ready_study_carries_the_verdict_across_processes_and_into_the_outputs_extra(recorded):
    ready = prepare_study(_recording(recorded["C3-M2"], recorded["ECG II"]), default_table(),
                          quality=QualityThresholds(line_noise_max_ratio=0.2))
    copy = pickle.loads(pickle.dumps(ready))
    assert copy.quality.as_dict() == ready.quality.as_dict()
    doc = json.loads(json.dumps(outputs_extra(ready, None)))["quality"]
    assert doc["interpretable"] is True and doc["reasons"] == [] and doc["warnings"] == []
    assert doc["modalities"] == {"BAS": {"usable": 1, "channels": 1}, "EKG": {"usable": 1, "channels": 1}}
    assert doc["thresholds"]["line_noise_max_ratio"] == 0.2
    channel = doc["channels"]["C3-M2"]
    assert channel["problems"] == [] and channel["usable"] is True and channel["modality"] == "BAS"
    assert set(channel) >= {"flat_fraction", "clipped_fraction", "gap_fraction", "line_noise_ratio", "amplitude_uv",
                            "typical_epoch_sd", "longest_dropout_s", "notes"}


def test_configuration_section_gives_the_thresholds():
    assert GatewayConfig().quality.thresholds() == QualityThresholds()
    custom = QualityConfig.model_validate({"line_noise_max_ratio": 0.5, "amplitude_uv": {"ekg": [None, 8000]},
                                           "typical_sd_modalities": ["BAS"]}).thresholds()
    assert custom.line_noise_max_ratio == 0.5 and custom.amplitude_uv["EKG"] == (None, 8000.0)
    assert custom.amplitude_uv["BAS"] == (0.1, 1000.0) and custom.typical_sd_modalities == ("BAS",)
    with pytest.raises(ValueError, match="flat_max_fraction"):
        QualityThresholds(flat_max_fraction=1.5)


def test_batch_jobs_carry_the_thresholds_to_the_workers(night):
    from gateway.batch.work import Prepared, PrepareJob, prepare

    strict = QualityThresholds(amplitude_uv={"BAS": (100.0, None)})  # every EEG "too small"
    job = PrepareJob(1, "k1", (str(night),), None, "archive:/a", quality=strict)
    done = prepare(pickle.loads(pickle.dumps(job)), default_table())
    assert isinstance(done, Prepared), done
    assert done.ready.quality.thresholds == strict and not done.ready.quality.interpretable
    assert done.ready.quality.channels["C3-M2"].problems == ["amplitude_low"]


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    from inference.bundle import make_demo_bundle

    return make_demo_bundle(tmp_path_factory.mktemp("bundle") / "demo")


def test_metrics_json_gets_the_quality_key(tmp_path, night, demo_bundle):
    from inference.bundle import load_bundle
    from inference.engine import Engine, EngineOptions

    ready = prepare_study(read_recording(night), default_table(), key="k")
    result = infer_ready(Engine(load_bundle(demo_bundle), EngineOptions(device="cpu")), ready)
    store_outputs(result, tmp_path / "out", ready)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["quality"]["interpretable"] is True and metrics["quality"]["reasons"] == []
    assert len(metrics["quality"]["channels"]) == 18
    assert metrics["quality"]["channels"]["ECG II"]["problems"] == []
    assert metrics["timings_s"]["quality"] > 0


def test_the_daemons_pipeline_uses_its_configured_thresholds(db_url, tmp_path, model, night):
    from gateway.store.models import State

    db, repo, pipe, paths = pipeline_env(db_url, tmp_path, *model)
    try:
        pipe.quality = QualityThresholds(amplitude_uv={"BAS": (100.0, None)})  # as the daemon sets it
        study = spool_file(paths, "night.edf", night.read_bytes(), repo)
        assert pipe.run_once("n:1:w0")
        done = repo.get(study.id)
        assert done.state == State.FLAGGED
        metrics = json.loads((Path(done.output_path) / "metrics.json").read_text())
        assert metrics["quality"]["interpretable"] is False
        assert metrics["quality"]["reasons"][0].startswith("BAS has no usable channel: F3-M2 (amplitude_low)")
        assert done.flags["risk_flags"]["suppressed"] is True and "quality" in done.flags["risk_flags"]["kinds"]
    finally:
        db.dispose()


def test_infer_reads_the_quality_section_of_a_config(tmp_path, night, demo_bundle):
    from gateway.cli.main import app

    config = tmp_path / "config.yaml"
    config.write_text("quality:\n  amplitude_uv:\n    ekg: [1000, null]\n")
    result = CliRunner().invoke(app, ["infer", str(night), "--bundle", str(demo_bundle), "--out",
                                      str(tmp_path / "out"), "--config", str(config)], env={"PSG_CONFIG": None})
    assert result.exit_code == 0, result.output
    quality = json.loads((tmp_path / "out" / "metrics.json").read_text())["quality"]
    assert quality["interpretable"] is False and quality["channels"]["ECG II"]["problems"] == ["amplitude_low"]
    assert quality["reasons"] == ["EKG has no usable channel: ECG II (amplitude_low)"]
    assert "NOT interpretable" in result.output


def test_channel_quality_keeps_its_thresholds_when_replaced(recorded):
    c3 = recorded["C3-M2"]
    strict = QualityThresholds(flat_epsilon=0.5)
    checked = assess_channel("C3-M2", "BAS", c3.read(), c3.sampling_rate, unit="uV", thresholds=strict)
    assert replace(checked, problems=["flat"]).thresholds is strict
