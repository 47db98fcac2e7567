"""`esp-serve` / `python -m server`: serve one model over the OpenAI API."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import uvicorn

from esp_engine.config import METHODS, PRESETS, QUANTIZATION_METHODS
from esp_engine.errors import InvalidRequestError, InvalidSpecConfigError
from esp_engine.loader import LoadedModel
from esp_engine.scheduler import SchedulerConfig

from .admission import DEFAULT_MAX_WAITING_REQUESTS, Admission
from .app import ServerSettings, build_app
from .limits import DEFAULT_MAX_REQUEST_BYTES
from .logs import LOG_FORMATS, configure

log = logging.getLogger("server.cli")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="esp-serve", description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a Llama-family GGUF file, the embedded model name, a local Hugging Face directory "
                        "or a cached hub id")
    p.add_argument("--method", default="hybrid", choices=METHODS,
                   help="default speculative method ('ar' = off; hybrid = ESP masks and PLD chains in one tree)")
    p.add_argument("--preset", default="bc30", help=f"block-complexity preset ({', '.join(PRESETS)})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--dtype", default=None,
                   help="auto (the default): bfloat16 where the device computes it natively (a GPU, a CPU with "
                        "amx_bf16 or avx512_bf16), else float32; or float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quantization", default="none", choices=QUANTIZATION_METHODS,
                   help="quantization of the linears, CPU only: none (default); int8 (weights, one scale per "
                        "output channel; the LM head too where our kernels run); int4 (weights, groups of 32; "
                        "int8 head); w8a8 (int8 weights and activations, the activations per group of 32, on "
                        "CPUs with AVX512-VNNI; the head too)")
    p.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + completion tokens")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run decode steps eagerly as they come instead of padded into captured CUDA "
                        "graphs (a CPU always runs them eagerly)")
    p.add_argument("--api-key", default=os.environ.get("ESP_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $ESP_SERVE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model name clients send (default: the model's)")
    lim = p.add_argument_group("limits and shutdown")
    lim.add_argument("--max-request-bytes", type=_at_least(1), default=DEFAULT_MAX_REQUEST_BYTES,
                     help=f"larger request bodies get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    lim.add_argument("--max-waiting-requests", type=_at_least(0), default=DEFAULT_MAX_WAITING_REQUESTS,
                     help="requests queued beyond --max-num-seqs before new ones get 429 with Retry-After "
                          f"(default {DEFAULT_MAX_WAITING_REQUESTS})")
    lim.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long requests in flight may run before the server exits "
                          "(default 30); a second signal exits at once")
    lim.add_argument("--engine-step-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="one engine step running longer than this counts as a hang: /health answers 503 "
                          "(default 300)")
    b = p.add_argument_group("batching and KV cache")
    b.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded at once (default 64)")
    b.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="rows of one forward pass: decode blocks plus prefill chunks (default 1024)")
    b.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV cache size in GiB (default: enough for max-num-seqs full-length requests, "
                        "at most 4 GiB on CPU or 80%% of free GPU memory)")
    b.add_argument("--block-size", type=int, default=16, help="KV slots per cache block (default 16)")
    b.add_argument("--max-rows-per-step", type=int, default=None,
                   help="cap on the decode rows of one pass; draft trees shrink to their share")
    b.add_argument("--load-adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="size draft trees each pass from measured step cost and acceptance (default on)")
    b.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes seen before (default on)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="'json': one JSON object per log line on stderr, uvicorn's lines included")
    args = p.parse_args(argv)
    if not args.shutdown_timeout >= 0:
        p.error("--shutdown-timeout must be a number of seconds, 0 or more")
    if not args.engine_step_timeout > 0:
        p.error("--engine-step-timeout must be a positive number of seconds")
    return args


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its error message
    return parse


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain: the first SIGTERM or SIGINT stops admitting work (503, /ready
    fails) while the listener stays open, and the server exits once the requests in flight
    have finished or `timeout` has passed; a second signal exits at once.

    uvicorn's own handling closes the listener at the first signal, and then re-raises the
    signal, so a drained SIGTERM would end the process as killed rather than with status 0."""

    def __init__(self, config: uvicorn.Config, admission: Admission, timeout: float) -> None:
        super().__init__(config)
        self.admission = admission
        self.timeout = timeout
        self.first_signal: int | None = None
        self._deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.first_signal is not None:
            os._exit(128 + sig)  # the conventional status of a process ended by that signal
        self.first_signal = sig
        self.admission.begin_drain()
        self._deadline = time.monotonic() + self.timeout

    async def on_tick(self, counter: int) -> bool:
        if self._deadline is not None and not self.should_exit:
            if self.admission.in_flight == 0:
                log.info("drained: no requests in flight; shutting down")
                self.should_exit = True
            elif time.monotonic() >= self._deadline:
                log.warning("shutdown timeout reached with %d request(s) in flight; cancelling them",
                            self.admission.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uvicorn_log_config = configure(args.log_level, args.log_format)

    def complain(message: str) -> None:
        if args.log_format == "json":  # keep stderr one JSON object per line; fatal, so shown at any level
            log.critical(message)
        else:
            print(message, file=sys.stderr, flush=True)

    try:
        scheduler = SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_bytes=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory is not None else None,
            block_size=args.block_size, max_rows_per_step=args.max_rows_per_step, load_adaptive=args.load_adaptive,
            enable_prefix_caching=args.enable_prefix_caching)
    except InvalidRequestError as exc:
        print(f"esp-serve: {exc}", file=sys.stderr)
        return 2
    settings = ServerSettings(model=args.model, method=args.method, preset=args.preset, dtype=args.dtype,
                              quantization=args.quantization, device=args.device, max_model_len=args.max_model_len, api_key=args.api_key or None,
                              served_model_name=args.served_model_name, scheduler=scheduler,
                              max_request_bytes=args.max_request_bytes,
                              max_waiting_requests=args.max_waiting_requests,
                              shutdown_timeout=args.shutdown_timeout,
                              engine_step_timeout=args.engine_step_timeout, enforce_eager=args.enforce_eager)
    failed = threading.Event()
    server: DrainingServer | None = None

    def on_ready(loaded: LoadedModel) -> None:
        # The model may finish loading before uvicorn has bound its socket; the URL is only true after.
        while server is not None and not server.started and not server.should_exit:
            time.sleep(0.05)
        if server is None or server.should_exit:
            return
        host, port = _bound_address(server, args.host, args.port)
        name = settings.served_model_name or loaded.name
        print(f"esp-serve: model {name!r} ready, listening on http://{host}:{port}", flush=True)

    def on_error(exc: BaseException) -> None:
        complain(f"esp-serve: cannot load model {args.model!r}: {exc}")
        failed.set()
        if server is not None:
            server.should_exit = True

    try:
        app = build_app(settings, on_ready=on_ready, on_error=on_error)
    except InvalidSpecConfigError as exc:
        complain(f"esp-serve: {exc}")
        return 2
    extra = {"log_config": uvicorn_log_config} if uvicorn_log_config else {}  # text: uvicorn's own format
    # Once drained, only idle connections remain open, so uvicorn's own wait stays short; after
    # a timed-out drain it cancels what is left.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, **extra)
    server = DrainingServer(config, app.state.admission, args.shutdown_timeout)
    server.run()
    if failed.is_set():
        return 1
    return 130 if server.first_signal == signal.SIGINT else 0  # 130: Ctrl-C's conventional status


def _bound_address(server: uvicorn.Server, host: str, port: int) -> tuple[str, int]:
    for s in getattr(server, "servers", []):
        for sock in getattr(s, "sockets", []) or []:
            addr = sock.getsockname()
            return (host, addr[1])
    return host, port


if __name__ == "__main__":
    sys.exit(main())
