"""A process that builds the toy model, runs forwards and reports what compiled, as JSON.

``python -m tests.compile.probe [options]`` prints ``PROBE_RESULT {json}``. Tests run it in
fresh processes that share cache directories, to check warm starts, AOT artifacts and caches.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64,1,4,16,24,48,64,8192")
    parser.add_argument("--split-points", default="8,32")
    parser.add_argument("--compile-sizes", default="16,64,128")
    parser.add_argument("--splitting", action="store_true")
    parser.add_argument("--weight-only-piece", action="store_true")
    args = parser.parse_args(argv)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    from vllm_compilation import install, toy_model

    fork = install()
    import torch
    from torch._dynamo.utils import counters
    from vllm.compilation.counter import compilation_counter

    config = toy_model.make_vllm_config(
        split_points=ints(args.split_points),
        compile_sizes=ints(args.compile_sizes),
        splitting=args.splitting or args.weight_only_piece,
    )
    model = toy_model.build_model(config, weight_only_piece=args.weight_only_piece)
    backend, inductor, outputs, errors = [], [], {}, []
    for batch in ints(args.sizes):
        before = (
            compilation_counter.num_backend_compilations,
            compilation_counter.num_inductor_compiles,
        )
        out = toy_model.run_forward(model, config, batch)
        backend.append(compilation_counter.num_backend_compilations - before[0])
        inductor.append(compilation_counter.num_inductor_compiles - before[1])
        x = torch.linspace(-1, 1, batch * 16).reshape(batch, 16)
        errors.append(float((out - toy_model.eager_reference(model, x)).abs().max()))
        outputs[str(batch)] = out.tolist()
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
        "backend_compilations": backend,
        "inductor_compiles": inductor,
        "max_abs_error": max(errors),
        "outputs": outputs,
    }
    print("PROBE_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
