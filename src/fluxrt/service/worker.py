"""The model worker: one thread owns the pipeline and runs queued jobs, batching the compatible ones.

Contract:
    Worker(config, store, hub, spec, guard, metrics, paths).start() / .stop() / .notify()
        loads the pipeline in its own thread (state "loading" -> "ready", or "error" with the reason), then loops:
        claim the oldest queued job plus later ones of the same size, steps, guidance and reference layout (up to
        `max_batch` images), run them as one batch, finish each job exactly once.
    Hub: in-memory progress, previews, cancel requests and finished flags shared with the HTTP routes.

A job's life in the worker: rebuild its request from the stored params and reference files, validate it again
(same seed, so a resumed job makes the same images), check its prompt and references with the safety guard, run,
then per job: cancelled (DELETE while running) / failed (run-time limit passed, or the guard blocked an output:
nothing is saved then) / succeeded (every image saved atomically, then the store marks it done). The step callback
checks cancel requests and deadlines after every step; the batch stops early when no job in it still wants it.
A server stopped while running a batch puts its jobs back in the queue; a killed one leaves them running, and
`JobStore.recover` queues them again at the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image

from ..outputs import save_image
from ..request import GenerationRequest, ValidRequest, validate
from .preview import LatentPreview, data_url
from .store import Job, JobStore

log = logging.getLogger(__name__)


class _Abort(Exception):
    """Every job of the running batch was cancelled or ran out of time."""


class _Stop(Exception):
    """The server is shutting down."""


class Hub:
    """Progress, previews, cancel requests and finished flags of jobs, shared between threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._progress: dict[str, tuple[int, int, int, str | None]] = {}  # id -> (version, step, total, preview)
        self._preview_wanted: dict[str, int] = defaultdict(int)
        self._cancel: set[str] = set()
        self._done: set[str] = set()
        self.completions: dict[str, int] = defaultdict(int)  # id -> times finished by this process (tests: 1)

    def update(self, job_id: str, step: int, total: int, preview: str | None = None) -> None:
        with self._lock:
            version = self._progress.get(job_id, (0,))[0] + 1
            self._progress[job_id] = (version, step, total, preview)

    def progress(self, job_id: str):
        with self._lock:
            return self._progress.get(job_id)

    def want_preview(self, job_id: str, delta: int) -> None:
        with self._lock:
            self._preview_wanted[job_id] += delta
            if self._preview_wanted[job_id] <= 0:
                del self._preview_wanted[job_id]

    def wants_preview(self, job_id: str) -> bool:
        with self._lock:
            return self._preview_wanted.get(job_id, 0) > 0

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancel.add(job_id)

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel

    def mark_done(self, job_id: str) -> None:
        with self._lock:
            self._done.add(job_id)
            self.completions[job_id] += 1
            self._progress.pop(job_id, None)
            self._cancel.discard(job_id)

    def is_done(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._done


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys run in one batch: same output size, steps, guidance and reference sizes."""
    p = job.params
    return (p["width"], p["height"], p["steps"], p["guidance"], tuple(tuple(s) for s in p.get("ref_sizes", ())))


class Worker:
    def __init__(self, config, store: JobStore, hub: Hub, spec, guard, metrics, paths):
        self.config, self.store, self.hub, self.spec = config, store, hub, spec
        self.guard, self.metrics, self.paths = guard, metrics, paths
        self.pipe = config.pipeline
        self.previewer: LatentPreview | None = None
        self.state, self.error = "loading", None
        self.model_lock = threading.Lock()  # the model runs one thing at a time (jobs, text embeddings)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="fluxrt-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def notify(self) -> None:
        self._wake.set()

    def _load(self) -> None:
        if self.pipe is None:
            if self.config.loader is not None:
                self.pipe = self.config.loader()
            else:
                from ..pipeline import Pipeline

                self.pipe = Pipeline.load(self.config.model, device=self.config.device, dtype=self.config.dtype,
                                          step_cache=self.config.step_cache)  # fmt: skip
        if self.pipe.spec.name != self.spec.name:
            raise RuntimeError(f"the loaded model is {self.pipe.spec.name!r}, requests were validated for "
                               f"{self.spec.name!r}")  # fmt: skip
        if self.config.previews:  # a few tiny VAE encodes, once per autoencoder
            self.previewer = LatentPreview.fit(self.pipe.ae)

    def _main(self) -> None:
        try:
            self._load()
            self.state = "ready"
            log.info("model %s ready on %s", self.pipe.name, self.pipe.device)
        except Exception as e:
            self.state, self.error = "error", f"{type(e).__name__}: {e}"
            log.exception("the model failed to load")
            return
        while not self._stop.is_set():
            self._wake.clear()
            batch = self.store.claim(self.config.max_batch, batch_key)
            if not batch:
                self._wake.wait(0.5)
                continue
            try:
                self._run_batch(batch)
            except _Stop:
                return
            except Exception as e:  # e.g. a safety filter that raised: fail these jobs, keep the worker alive
                log.exception("batch of %d jobs failed", len(batch))
                for job in batch:
                    self._fail(job, f"internal error: {type(e).__name__}: {e}", "server_error")

    # ------------------------------------------------------------------------------------------- one batch
    def _request(self, job: Job) -> ValidRequest:
        p = job.params
        refs = []
        for k in range(len(p.get("ref_sizes", ()))):
            with Image.open(self.paths.ref(job.id, k)) as im:
                refs.append(im.convert("RGB"))
        req = GenerationRequest(prompt=p["prompt"], negative=p.get("negative"), width=p["width"], height=p["height"],
                                steps=p["steps"], guidance=p["guidance"], seed=p["seed"],
                                num_images=p["num_images"], refs=refs)  # fmt: skip
        return validate(req, self.spec, self.config.limits.request)

    def _check_inputs(self, job: Job, valid: ValidRequest) -> str | None:
        """The reason the guard blocks the prompt or a reference, or None."""
        policy = self.guard.policy
        checks = []
        if policy.ip_check:
            checks.append(("prompt", lambda: self.guard.check_prompt(valid.samples[0].prompt)))
        if policy.nsfw or policy.ip_check:
            checks += [(f"image[{k}]", lambda im=im: self.guard.check_image(im))
                       for k, im in enumerate(valid.samples[0].refs)]  # fmt: skip
        for subject, check in checks:
            d = check()
            self.store.log_decision(job.id, subject, d.allowed, d.reason, d.flags, d.scores)
            if not d.allowed:
                return f"{subject} was blocked by the safety policy: {d.reason}"
        return None

    def _fail(self, job: Job, message: str, code: str) -> None:
        self._finish(job, "failed", message, code)

    def _finish(self, job: Job, status: str, error: str | None = None, code: str | None = None,
                records: list | None = None) -> None:  # fmt: skip
        finished = self.store.finish(job.id, status, error, code, records)  # False: it was finished already
        if finished:
            now = time.time()
            self.metrics.finished(status, now - job.created_at, now - job.started_at if job.started_at else None)
            if code == "content_policy_violation":
                self.metrics.blocked()
        if finished or not self.hub.is_done(job.id):
            self.hub.mark_done(job.id)

    def _prepare(self, jobs: list[Job]) -> list[tuple[Job, ValidRequest]]:
        ready = []
        for job in jobs:
            if self.hub.cancelled(job.id):
                self._finish(job, "cancelled", "cancelled before it started")
                continue
            try:
                valid = self._request(job)
            except Exception as e:  # noqa: BLE001 - e.g. a reference file removed by hand
                self._fail(job, f"the stored request cannot be rebuilt: {e}", "invalid_request")
                continue
            reason = self._check_inputs(job, valid)
            if reason:
                self._fail(job, reason, "content_policy_violation")
                continue
            ready.append((job, valid))
        return ready

    def _run_batch(self, jobs: list[Job]) -> None:
        ready = self._prepare(jobs)
        if not ready:
            return
        samples = [s for _, v in ready for s in v.samples]
        v0 = ready[0][1]
        h, w = v0.height // 16, v0.width // 16
        deadline = {j.id: j.started_at + float(j.params["timeout"]) for j, _ in ready}
        offsets = [sum(len(v.samples) for _, v in ready[:k]) for k in range(len(ready))]
        for job, _ in ready:
            self.hub.update(job.id, 0, v0.steps)
        last = {}

        def on_step(i: int, tokens) -> None:  # tokens (B, h*w, 128)
            last["tokens"] = tokens
            for (job, _), off in zip(ready, offsets):
                preview = None
                if self.previewer is not None and self.hub.wants_preview(job.id):
                    preview = data_url(self.previewer.preview(tokens[off], h, w))
                self.hub.update(job.id, i + 1, v0.steps, preview)
            if self._stop.is_set():
                raise _Stop
            now = time.time()
            if all(self.hub.cancelled(j.id) or now > deadline[j.id] for j, _ in ready):
                raise _Abort

        self.metrics.batch(len(samples))
        images = None
        try:
            with self.model_lock:
                images = self.pipe.generate(samples, v0.width, v0.height, v0.steps, v0.guidance, on_step,
                                            max_batch=len(samples))  # fmt: skip
        except _Abort:
            pass
        except _Stop:
            self.store.requeue([j.id for j, _ in ready])
            raise
        except Exception as e:
            log.exception("batch of %d jobs failed", len(ready))
            for job, _ in ready:
                self._fail(job, f"the model failed: {type(e).__name__}: {e}", "server_error")
            return
        if images is not None and self.previewer is not None:  # previews learn what this model makes
            self.previewer.observe(last["tokens"].reshape(-1, last["tokens"].shape[-1]), images)
        for (job, valid), off in zip(ready, offsets):
            mine = images[off : off + len(valid.samples)] if images is not None else None
            try:
                self._complete(job, valid, mine, deadline[job.id])
            except Exception as e:
                log.exception("job %s could not be completed", job.id)
                self._fail(job, f"finishing the job failed: {type(e).__name__}: {e}", "server_error")

    def _signer(self, record: dict, refs):
        """The C2PA signer of one result, or None when the deployment has no certificate."""
        if self.config.c2pa_cert is None:
            return None
        from ..safety.provenance import signer_for

        return signer_for(self.config.c2pa_cert, self.config.c2pa_key, str(record.get("model", "unknown model")), refs)

    def _complete(self, job: Job, valid: ValidRequest, images, deadline: float) -> None:
        if self.hub.cancelled(job.id):
            return self._finish(job, "cancelled", "cancelled while running")
        if images is None or time.time() > deadline:
            limit = float(job.params["timeout"])
            return self._fail(job, f"timeout: the job ran longer than its limit of {limit:g} s", "timeout")
        run_info = self.pipe.run_info()  # the batch's: dtype, device, lossy settings (step cache and its counts)
        records = [{**valid.record(i), **run_info} for i in range(len(images))]
        finals = []
        for i, (im, rec) in enumerate(zip(images, records)):
            out, d = self.guard.finalize(im, {**rec, "request_id": job.id})
            self.store.log_decision(job.id, f"output {i}", d.allowed, d.reason, d.flags, d.scores)
            if out is None:  # a flagged output is neither returned nor saved, and no image of the job is saved
                return self._fail(job, f"output {i} was blocked by the safety policy: {d.reason}",
                                  "content_policy_violation")  # fmt: skip
            finals.append(out)
        for i, (im, rec) in enumerate(zip(finals, records)):
            sign = self._signer(rec, valid.samples[i].refs)
            save_image(im, self.paths.result(job.id, i), rec, "png", overwrite=True, sign=sign)  # atomic
        self._finish(job, "succeeded", records=records)


class Paths:
    """Every file the service writes, built from validated job ids and integers only."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir)

    def ref(self, job_id: str, k: int) -> Path:
        return self.root / "refs" / job_id / f"{int(k)}.png"

    def result(self, job_id: str, i: int) -> Path:
        return self.root / "results" / job_id / f"{int(i)}.png"
