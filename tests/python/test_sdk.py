"""The Python binding driving the real engine on the default model.

The whole loop an app runs (import, explain, train with progress and a
cancel, streamed generation, export, forget), the cross-check of effects
against the Rust CLI, the typed errors, calls from several threads, and
listener plumbing under load. Everything runs on the made-up demo users.
"""

import json
import math
import os
import struct
import subprocess
import threading
import time

import pytest

from conftest import DEMO_USERS, open_engine

REQUEST = "Category: Kitchen\nProduct: Electric kettle 1.7 litre\nRating: 5/5\nReview title: Boils fast"


def f32(x):
    """`x` rounded to the f32 it crossed the boundary as."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Recorder:
    """A TrainListener that records every event and stops when told to."""

    def __init__(self, nq, stop_at_step=None):
        self.nq = nq
        self.events = []
        self.stop_at_step = stop_at_step
        self.first_step = threading.Event()
        self.threads = set()

    def on_event(self, event):
        self.events.append(event)
        self.threads.add(threading.get_ident())
        if isinstance(event, self.nq.TrainEvent.STEP):
            self.first_step.set()
            if self.stop_at_step is not None and event.step >= self.stop_at_step:
                return self.nq.Flow.STOP
        return self.nq.Flow.CONTINUE

    def steps(self):
        return [e for e in self.events if isinstance(e, self.nq.TrainEvent.STEP)]


class Chunks:
    """A TextListener that keeps every piece; stops after `stop_after` pieces."""

    def __init__(self, nq, stop_after=None):
        self.nq = nq
        self.pieces = []
        self.stop_after = stop_after

    def on_text(self, text):
        self.pieces.append(text)
        if self.stop_after is not None and len(self.pieces) >= self.stop_after:
            return self.nq.Flow.STOP
        return self.nq.Flow.CONTINUE


def assert_whole_utf8(pieces):
    for piece in pieces:
        assert isinstance(piece, str) and piece, f"empty or non-text piece {piece!r}"
        assert "\ufffd" not in piece, f"piece {piece!r} holds a replacement character"
        assert piece.encode("utf-8").decode("utf-8") == piece


def test_the_whole_loop_on_the_default_model(nq, tmp_path, demo_jsonl, demo_users):
    engine = open_engine(nq, tmp_path, max_history_items=3, max_response_tokens=48)
    assert engine.model_info().architecture == "llama"

    # Import: every made-up item lands, in timestamp order.
    summary = engine.import_jsonl(demo_jsonl)
    assert summary.bad_lines == []
    assert summary.imported == sum(len(items) for items in demo_users.values())
    assert [u.user_id for u in engine.users()] == sorted(demo_users)
    history = engine.history("cleo")
    assert [h.item_id for h in history] == [h["id"] for h in demo_users["cleo"]]
    assert history[-1].text == demo_users["cleo"][-1]["output"]

    # Add one more text; writing it again changes nothing.
    extra = nq.HistoryItem(
        user_id="cleo",
        item_id="cleo-app-1",
        timestamp="2025-12-01T09:00:00Z",
        request="Category: Kitchen\nProduct: Bread knife\nRating: 4/5\nReview title: Sharp",
        text="Cuts a crusty loaf cleanly. Handle is a bit short for big hands. Would buy again.",
    )
    assert engine.add_item(extra) == nq.WriteOutcome.INSERTED
    assert engine.add_item(extra) == nq.WriteOutcome.UNCHANGED
    assert engine.history("cleo")[-1].source == "app"

    # Explain: per-token effects whose numbers agree with each other.
    target = demo_users["cleo"][-1]
    explanation = engine.explain("cleo", target["id"])
    tokens = explanation.tokens
    assert 0 < len(tokens) <= 48
    assert target["output"].startswith("".join(t.text for t in tokens))
    assert explanation.history_used == 3
    assert math.isclose(sum(t.weight for t in tokens), 1.0, abs_tol=1e-4)
    for t in tokens:
        assert t.preference_bearing == (t.delta_p > explanation.delta)
        assert math.isclose(
            t.delta_p, math.exp(t.logp_with) - math.exp(t.logp_without), abs_tol=1e-5
        )
    share = sum(t.preference_bearing for t in tokens) / len(tokens)
    assert math.isclose(explanation.preference_bearing_share, share, abs_tol=1e-6)
    # The second call comes from the store's cache and is the same.
    assert engine.explain("cleo", target["id"]) == explanation

    # Train: two steps with progress; the new adapter becomes active. Quick
    # reads on this thread must not wait for the training on the other one.
    recorder = Recorder(nq)
    outcome = {}
    options = nq.TrainOptions(latest_items=2, learning_rate=1e-3, warmup_steps=1)

    def train():
        outcome["result"] = engine.train("cleo", options, recorder)

    trainer = threading.Thread(target=train)
    started = time.monotonic()
    trainer.start()
    assert recorder.first_step.wait(timeout=600), "no training step within 10 minutes"
    read_seconds = []
    for _ in range(3):
        t0 = time.monotonic()
        assert len(engine.users()) == 3
        assert len(engine.history("cleo")) == 9
        assert engine.explain("cleo", target["id"]) == explanation
        read_seconds.append(time.monotonic() - t0)
    reads_overlapped = trainer.is_alive()
    trainer.join()
    train_seconds = time.monotonic() - started
    print(f"\ntraining 2 steps: {train_seconds:.1f} s; reads during it: "
          + ", ".join(f"{s * 1000:.0f} ms" for s in read_seconds))
    assert reads_overlapped, "training ended before the reads; they did not overlap"
    assert max(read_seconds) < 1.0, f"reads waited for the training: {read_seconds}"

    result = outcome["result"]
    steps = recorder.steps()
    assert [s.step for s in steps] == [1, 2]
    assert all(s.total_steps == 2 for s in steps)
    assert all(math.isfinite(s.loss) and s.loss > 0 for s in steps)
    assert result.outcome == nq.TrainOutcome.ACTIVATED
    assert result.steps == 2
    assert result.first_loss == steps[0].loss and result.last_loss == steps[1].loss
    assert result.gate_mean_kl is not None and 0 <= result.gate_mean_kl <= 1.0
    assert recorder.threads == {trainer.ident}, "progress came from another thread"
    adapters = engine.adapters("cleo")
    assert [(a.version, a.active) for a in adapters] == [(1, True)]
    assert adapters[0] == result.adapter
    assert json.loads(adapters[0].metrics_json)["steps"] == 2
    assert os.path.exists(adapters[0].path)

    # Cancel: the listener stops after the first step. The run returns the
    # typed Stopped outcome and the first adapter stays the active one.
    cancelling = Recorder(nq, stop_at_step=1)
    stopped = engine.train("cleo", options, cancelling)
    assert stopped.outcome == nq.TrainOutcome.STOPPED
    assert stopped.adapter is None and stopped.steps == 1
    assert [s.step for s in cancelling.steps()] == [1]
    assert [(a.version, a.active) for a in engine.adapters("cleo")] == [(1, True)]

    # Generation: streamed pieces are whole UTF-8 and add up to the text.
    generic_pieces = Chunks(nq)
    options = nq.GenerateOptions(max_tokens=40)
    generic = engine.generate(None, REQUEST, options, generic_pieces)
    personal_pieces = Chunks(nq)
    personal = engine.generate("cleo", REQUEST, options, personal_pieces)
    print(f"generic:  {generic.text!r}\npersonal: {personal.text!r}")
    for result, pieces in [(generic, generic_pieces), (personal, personal_pieces)]:
        assert result.tokens > 0
        assert result.finish in (nq.FinishReason.END_OF_TEXT, nq.FinishReason.MAX_TOKENS)
        assert_whole_utf8(pieces.pieces)
        assert "".join(pieces.pieces) == result.text
    assert personal.prompt_tokens > generic.prompt_tokens, "the history is not in the prompt"
    # Non-Latin text streams as whole characters too.
    pieces = Chunks(nq)
    unicode = engine.generate(
        None, "Répète exactement: «Ça coûte 5 €» puis écris 東京 et 🙂", options, pieces
    )
    assert_whole_utf8(pieces.pieces)
    assert "".join(pieces.pieces) == unicode.text
    # A listener that says stop gets no more pieces.
    three = Chunks(nq, stop_after=3)
    cut = engine.generate(None, REQUEST, options, three)
    assert cut.finish == nq.FinishReason.STOPPED
    assert len(three.pieces) == 3 and cut.text == "".join(three.pieces)
    # Without a listener the text only comes back, the same for greedy decoding.
    assert engine.generate(None, REQUEST, options, None).text == generic.text

    # Export: one JSONL line that holds the user's texts.
    exported = json.loads(engine.export_user("cleo"))
    assert exported["user_id"] == "cleo"
    assert [h["id"] for h in exported["history"]] == [h.item_id for h in engine.history("cleo")]

    # Forget: no item, no adapter, no file is left.
    adapter_path = adapters[0].path
    forgot = engine.forget("cleo")
    assert forgot.items == 9 and forgot.adapters == 1 and forgot.left_for_app == []
    assert forgot.cached_effects >= 1
    assert "cleo" not in [u.user_id for u in engine.users()]
    with pytest.raises(nq.NextquillError.UnknownUser):
        engine.history("cleo")
    assert engine.adapters("cleo") == []
    assert not os.path.exists(adapter_path)
    assert not os.path.exists(os.path.dirname(adapter_path)), "checkpoint folder left"
    # The other users are untouched.
    assert len(engine.history("ava")) == len(demo_users["ava"])


def test_effects_equal_what_the_rust_cli_computes(
    nq, tmp_path, demo_jsonl, demo_users, cli_path, model_path
):
    # Two stores filled from the same file: one measured through the binding,
    # one by the `nextquill` binary, so neither reads the other's cache.
    engine = open_engine(nq, tmp_path / "ffi", threads=1)
    engine.import_jsonl(demo_jsonl)
    item = demo_users["ben"][-1]["id"]
    explanation = engine.explain("ben", item)

    cli_db = tmp_path / "cli" / "history.sqlite3"
    cli = [cli_path, "--model", model_path, "--db", str(cli_db), "--threads", "1"]
    subprocess.run(cli + ["import", str(DEMO_USERS)], check=True, capture_output=True)
    out = subprocess.run(
        cli + ["explain", "--user", "ben", "--item", item, "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    rust = json.loads(out)

    assert explanation.history_used == rust["history_used"]
    assert len(explanation.tokens) == len(rust["tokens"])
    for ours, theirs in zip(explanation.tokens, rust["tokens"]):
        assert ours.token == theirs["token"] and ours.text == theirs["text"]
        for field in ["logp_with", "logp_without", "delta_p", "delta_logp", "weight"]:
            assert getattr(ours, field) == f32(theirs[field]), (field, ours, theirs)
        assert ours.preference_bearing == theirs["preference_bearing"]


def test_errors_cross_as_typed_variants_with_actionable_messages(nq, tmp_path, demo_jsonl):
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(nq.NextquillError.Model) as error:
        nq.NextquillEngine.open(str(tmp_path / "h.sqlite3"), str(missing), nq.EngineConfig())
    assert str(missing) in str(error.value)

    engine = open_engine(nq, tmp_path)
    engine.import_jsonl(demo_jsonl)
    with pytest.raises(nq.NextquillError.UnknownUser) as error:
        engine.history("nobody")
    assert "import their history first" in str(error.value)
    with pytest.raises(nq.NextquillError.UnknownItem) as error:
        engine.explain("ava", "ava-99")
    assert "ava-99" in str(error.value)
    with pytest.raises(nq.NextquillError.UnknownAdapter):
        engine.activate_adapter("ava", 7)
    bad_time = nq.HistoryItem(
        user_id="dan", item_id="d1", timestamp="yesterday", request="r", text="t", source=""
    )
    with pytest.raises(nq.NextquillError.InvalidArgument) as error:
        engine.add_item(bad_time)
    assert "RFC 3339" in str(error.value)
    lonely = nq.HistoryItem(
        user_id="dan", item_id="d1", timestamp="2025-01-01T00:00:00Z", request="r", text="t"
    )
    engine.add_item(lonely)
    with pytest.raises(nq.NextquillError.InvalidArgument) as error:
        engine.train("dan", nq.TrainOptions(), Recorder(nq))
    assert "import at least two texts" in str(error.value)
    with pytest.raises(nq.NextquillError.ContextOverflow):
        engine.generate(None, "hi", nq.GenerateOptions(max_tokens=100_000), None)
    # Every variant is a NextquillError, so one except clause catches them all.
    assert issubclass(nq.NextquillError.UnknownUser, nq.NextquillError)


def test_a_throwing_listener_fails_the_call_and_the_engine_stays_usable(
    nq, tmp_path, monkeypatch
):
    # The listener's exception becomes a Rust panic that is caught; Rust's
    # panic hook still prints it, so keep that to one line in the log.
    monkeypatch.setenv("RUST_BACKTRACE", "0")
    class Throws:
        def on_text(self, text):
            raise ValueError("the UI is gone")

    with pytest.raises(nq.NextquillError.ListenerFailed) as error:
        nq.callback_self_test(10, Throws())
    assert "ValueError('the UI is gone')" in str(error.value)

    engine = open_engine(nq, tmp_path)
    options = nq.GenerateOptions(max_tokens=8)
    with pytest.raises(nq.NextquillError.ListenerFailed):
        engine.generate(None, REQUEST, options, Throws())
    after = engine.generate(None, REQUEST, options, None)
    assert after.tokens > 0


def test_generations_on_several_threads_give_what_one_thread_gives(nq, tmp_path):
    engine = open_engine(nq, tmp_path, threads=1)
    options = nq.GenerateOptions(max_tokens=24)
    requests = [REQUEST, "Write one sentence about rain."]
    alone = [engine.generate(None, r, options, None).text for r in requests]
    together = [None] * 4

    def run(i):
        together[i] = engine.generate(None, requests[i % 2], options, Chunks(nq)).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == [alone[0], alone[1], alone[0], alone[1]]


def test_ten_thousand_callbacks_from_a_rust_background_thread(nq):
    class Collect:
        def __init__(self):
            self.pieces = []
            self.threads = set()

        def on_text(self, text):
            self.pieces.append(text)
            self.threads.add(threading.get_ident())
            return nq.Flow.CONTINUE

    listener = Collect()
    started = time.monotonic()
    report = nq.callback_self_test(10_000, listener)
    seconds = time.monotonic() - started
    print(f"\n10,000 callbacks from a Rust thread: {seconds * 1000:.0f} ms "
          f"({seconds / 10_000 * 1e6:.1f} µs each)")

    assert report.delivered == 10_000 and report.from_background_thread
    assert listener.pieces == [f"piece {i} · ü · 語 · 🙂\n" for i in range(10_000)]
    assert report.bytes == sum(len(p.encode("utf-8")) for p in listener.pieces)
    assert threading.get_ident() not in listener.threads and len(listener.threads) == 1
