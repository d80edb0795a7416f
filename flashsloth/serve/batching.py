"""
Batching for `flashsloth serve`: one worker thread owns the model; requests that arrive within a short collection
window (and while a batch runs) are left-padded into one batched `generate` call.

Each row of a batch streams and stops on its own: a per-row stopping criterion ends a row at its end-of-sequence
token, its own `max_tokens`, one of its stop strings, or when its client went away; `generate` returns once every row
has ended. Greedy rows give the same tokens batched as alone (left padding with the attention mask), so requests
batch together whatever their `max_tokens` and `stop`. Sampling rows share a call only with the same temperature and
top_p; a seeded sampling request runs alone, after `torch.manual_seed(seed)`, so the same request gives the same answer.
"""

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging

from .protocol import GenerationSettings


logger = logging.get_logger(__name__)
_job_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request: its processed inputs (batch of one), its settings and the queue its events go to.

    Events, put on `events` from the worker thread: `("delta", text)`, `("done", final_text, finish_reason, usage)`
    and `("error", exception)`.
    """

    inputs: dict
    settings: GenerationSettings
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.monotonic)
    number: int = field(default_factory=lambda: next(_job_ids))

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())

    def cancel(self) -> None:
        """Called when the client has gone: the row ends at the next decoding step, or the job never starts."""
        self.cancelled.set()

    def send(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass


def collate(jobs: list[Job], pad_token_id: int) -> dict:
    """Left-pad the jobs' inputs into one batch, as the processor pads a list of prompts."""
    length = max(job.inputs["input_ids"].shape[1] for job in jobs)
    batch = {}
    for name, pad in (("input_ids", pad_token_id), ("attention_mask", 0), ("instruction_mask", 0)):
        rows = []
        for job in jobs:
            row = job.inputs[name]
            rows.append(torch.cat([row.new_full((1, length - row.shape[1]), pad), row], dim=1))
        batch[name] = torch.cat(rows)
    for name in ("pixel_values", "image_num_crops"):
        batch[name] = torch.cat([job.inputs[name] for job in jobs])
    return batch


def visible_text(raw: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """The part of a row's decoded text that can be shown now, and whether a stop string ended it.

    Leading and trailing whitespace never shows; while the row runs, an incomplete UTF-8 character and a tail that
    could still grow into a stop string are held back, so what was streamed is always a prefix of the final text.
    """
    cuts = [raw.find(stop) for stop in stops if stop in raw]
    if cuts:
        return raw[: min(cuts)].strip(), True
    if final:
        return raw.strip(), False
    raw = raw.rstrip("\ufffd")
    hold = max((size for stop in stops for size in range(1, len(stop)) if raw.endswith(stop[:size])), default=0)
    return raw[: len(raw) - hold].strip(), False


class _Row:
    def __init__(self, job: Job):
        self.job = job
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None


class _BatchState(BaseStreamer, StoppingCriteria):
    """The streamer and the stopping criterion of one `generate` call: both see every row after every step."""

    def __init__(self, jobs: list[Job], tokenizer, eos_token_ids: set[int], step_delay: float):
        self.rows = [_Row(job) for job in jobs]
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.step_delay = step_delay
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first passes the prompt
            self.seen_prompt = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.finish_reason is not None:
                continue
            if row.job.cancelled.is_set():
                row.finish_reason = "cancelled"
                continue
            row.tokens.append(token)
            if token in self.eos_token_ids:
                self.finish(row, "stop")
                continue
            raw = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            text, stopped = visible_text(raw, row.job.settings.stop, final=False)
            if stopped:
                self.finish(row, "stop")
            elif len(row.tokens) >= row.job.max_tokens:
                self.finish(row, "length")
            elif text.startswith(row.sent) and len(text) > len(row.sent):
                row.job.send("delta", text[len(row.sent) :])
                row.sent = text
        if self.step_delay:
            time.sleep(self.step_delay)

    def end(self) -> None:
        for row in self.rows:
            if row.finish_reason is None:
                self.finish(row, "length" if len(row.tokens) >= row.job.max_tokens else "stop")

    def finish(self, row: _Row, reason: str) -> None:
        row.finish_reason = reason
        raw = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        text, _ = visible_text(raw, row.job.settings.stop, final=True)
        if not text.startswith(row.sent):
            logger.warning("request %d: the streamed text is not a prefix of the final answer", row.job.number)
        usage = {
            "prompt_tokens": row.job.prompt_tokens,
            "completion_tokens": len(row.tokens),
            "total_tokens": row.job.prompt_tokens + len(row.tokens),
        }
        row.job.send("done", text, reason, usage)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        for row in self.rows:
            if row.finish_reason is None and row.job.cancelled.is_set():
                row.finish_reason = "cancelled"
        done = [row.finish_reason is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class BatchingEngine:
    """The model's worker thread and its queue; `submit` is called from the event loop."""

    def __init__(
        self,
        model,
        processor,
        max_batch_size: int = 32,
        batch_window: float = 0.01,
        max_queue: int = 256,
        step_delay: float = 0.0,
    ):
        self.model = model
        self.processor = processor
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.max_queue = max_queue
        self.step_delay = step_delay
        tokenizer = processor.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        self.pending: list[Job] = []
        self.condition = threading.Condition()
        self.stopping = False
        self.running = 0
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "batched_requests": 0, "cancelled": 0}
        self.thread = threading.Thread(target=self._work, name="flashsloth-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        self.thread.join(timeout=30)

    def queued(self) -> int:
        with self.condition:
            return len(self.pending)

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        with self.condition:
            if len(self.pending) >= self.max_queue:
                return False
            self.pending.append(job)
            self.condition.notify_all()
            return True

    def _take_batch(self) -> list[Job] | None:
        with self.condition:
            while True:
                for job in [job for job in self.pending if job.cancelled.is_set()]:
                    self.pending.remove(job)
                    self.stats["cancelled"] += 1
                if self.stopping:
                    return None
                if self.pending:
                    break
                self.condition.wait()
            first = self.pending[0]
            key = first.settings.batch_key()
            if key is not None:
                deadline = first.arrival + self.batch_window
                while not self.stopping and time.monotonic() < deadline:
                    if sum(job.settings.batch_key() == key for job in self.pending) >= self.max_batch_size:
                        break
                    self.condition.wait(deadline - time.monotonic())
                batch = [job for job in self.pending if job.settings.batch_key() == key][: self.max_batch_size]
            else:
                batch = [first]
            for job in batch:
                self.pending.remove(job)
            self.running = len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as error:  # a failed batch fails its requests, never the server
                logger.error("generation failed for a batch of %d: %s", len(batch), error, exc_info=True)
                for job in batch:
                    job.send("error", error)
            finally:
                self.running = 0

    def _run(self, jobs: list[Job]) -> None:
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        if len(jobs) > 1:
            self.stats["batched_requests"] += len(jobs)
        inputs = collate(jobs, self.pad_token_id) if len(jobs) > 1 else dict(jobs[0].inputs)
        inputs = {name: value.to(self.model.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        state = _BatchState(jobs, self.processor.tokenizer, self.eos_token_ids, self.step_delay)
        settings = jobs[0].settings
        if settings.seed is not None and not settings.greedy:
            torch.manual_seed(settings.seed)
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                **settings.generate_kwargs(),
                max_new_tokens=max(job.max_tokens for job in jobs),
                stopping_criteria=StoppingCriteriaList([state]),
                streamer=state,
            )
        state.end()
        self.stats["cancelled"] += sum(row.finish_reason == "cancelled" for row in state.rows)
