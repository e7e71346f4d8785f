"""A process that starts the toy model as vLLM's engine does and reports what compiled, as JSON.

``python -m tests.compile.probe [options]`` loads the model under the config, runs the
engine's start-up forwards (profile run, warm-up) and then the serving forwards ``--sizes``,
all through the engine-shaped driver, and prints ``PROBE_RESULT {json}``. Tests run it in
fresh processes that share cache directories, to check warm starts, AOT artifacts and caches.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import sys
from typing import Any


def _watch_functorch(key: str) -> list[Any]:
    """Record torch._functorch.config.KEY whenever vLLM loads compiled graphs.

    The two places that load them are wrapped, and still do all their work: vLLM's compile
    cache (``CompilerManager.load``) and the mega AOT artifact (``load_all``).
    """
    import torch._functorch.config
    from vllm.compilation.backends import CompilerManager
    from vllm.compilation.caching import StandaloneCompiledArtifacts

    seen: list[Any] = []
    for owner, name in ((CompilerManager, "load"), (StandaloneCompiledArtifacts, "load_all")):
        original = getattr(owner, name)

        @functools.wraps(original)
        def watched(*args: Any, __original: Any = original, **kwargs: Any) -> Any:
            seen.append(getattr(torch._functorch.config, key))
            return __original(*args, **kwargs)

        setattr(owner, name, watched)
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64,1,4,16,24,48,64,8192", help="serving forwards")
    parser.add_argument("--split-points", default="8,32")
    parser.add_argument("--compile-sizes", default="16,64,128")
    parser.add_argument("--splitting", action="store_true")
    parser.add_argument("--weight-only-piece", action="store_true")
    parser.add_argument(
        "--functorch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set torch._functorch.config.KEY (a Python literal) before anything compiles",
    )
    parser.add_argument(
        "--watch-functorch",
        metavar="KEY",
        help="report torch._functorch.config.KEY while vLLM loads compiled graphs",
    )
    args = parser.parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    from vllm_compilation import install

    fork = install()
    import torch._functorch.config
    from torch._dynamo.utils import counters
    from vllm.compilation.counter import compilation_counter

    for setting in args.functorch:
        key, value = setting.split("=", 1)
        setattr(torch._functorch.config, key, ast.literal_eval(value))
    during_load = _watch_functorch(args.watch_functorch) if args.watch_functorch else []

    from vllm_compilation.harness import toy_model

    config = toy_model.make_vllm_config(
        split_points=ints(args.split_points),
        compile_sizes=ints(args.compile_sizes),
        splitting=args.splitting or args.weight_only_piece,
    )
    driver = toy_model.load(config, weight_only_piece=args.weight_only_piece)
    errors: list[float] = []
    outputs: dict[str, list[list[float]]] = {}

    def check(record, inputs, output) -> None:  # type: ignore[no-untyped-def]
        expected = toy_model.eager_reference(driver.model, inputs)
        errors.append(float((output - expected).abs().max()))
        if record.phase == "serve":
            outputs[str(record.num_tokens)] = output.tolist()

    driver.observers.append(check)
    # counters between model load and the first forward: nothing has compiled or loaded yet
    at_load = (
        compilation_counter.num_backend_compilations,
        compilation_counter.num_inductor_compiles,
    )
    observed_before = len(toy_model.forward_observations)
    driver.start()
    # what the first compiled forward saw when it started computing
    first_seen = toy_model.forward_observations[observed_before]
    for size in ints(args.sizes):
        driver.execute_model(size)

    def by_phase(*phases: str, key: str = "backend_compilations") -> list[int]:
        return [getattr(r, key) for r in driver.phase(*phases)]

    compiled_observations = toy_model.forward_observations[observed_before:]
    result = {
        # Inductor's and AOTAutograd's own caches: a miss is a compile inside torch, even
        # when vLLM believes it loaded a graph
        "torch_cache": {
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
            "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
        },
        "fork_active": fork.active,
        "startup_sizes": [r.num_tokens for r in driver.phase("profile", "warmup", "final_warmup")],
        # per forward: backend compilations (compiles and cache loads) and Inductor compiles
        "startup_backend": by_phase("profile", "warmup", "final_warmup"),
        "startup_inductor": by_phase("profile", "warmup", "final_warmup", key="inductor_compiles"),
        "backend_compilations": by_phase("serve"),
        "inductor_compiles": by_phase("serve", key="inductor_compiles"),
        # counters at model load, when the first forward started computing, and at the end
        "counters_at_load": list(at_load),
        "counters_at_first_forward": [
            first_seen.backend_compilations,
            first_seen.inductor_compiles,
        ],
        "counters_at_end": [
            compilation_counter.num_backend_compilations,
            compilation_counter.num_inductor_compiles,
        ],
        # a vLLM config was current in some compiled forward (the engine never sets one)
        "config_current_at_forward": any(o.config_current for o in compiled_observations),
        # the watched functorch setting, each time vLLM loaded compiled graphs
        "functorch_during_load": during_load,
        "max_abs_error": max(errors),
        "outputs": outputs,
    }
    print("PROBE_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
