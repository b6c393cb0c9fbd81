"""Command line: `python -m training {train,evaluate,export,attach-report,ood-eval,calibrate,triton-repo,
make-shapes}` (also installed as `vae-train`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

from training.data import DataError

if typing.TYPE_CHECKING:
    from training.train import TrainConfig
    from training.train_vq import VQTrainConfig

TRAIN_HELP = {
    "data": "data set: mnist5k | digits8 | idx:DIR | folder:DIR | npz:FILE",
    "out_dir": "run directory for metrics.jsonl, last.pt and best.pt",
    "conditional": "conditional VAE: labels go into encoder and decoder",
    "objective": "elbo (with --beta, --kl-warmup-epochs) or iwae (with --iw-samples)",
    "iw_samples": "k, the number of importance samples of the IWAE objective",
    "beta": "weight on the KL term (beta-VAE); 1 is the ELBO",
    "kl_warmup_epochs": "anneal the KL weight linearly from 0 to beta over this many epochs",
    "input_noise": "std of Gaussian noise added to the encoder input (denoising VAE)",
    "binarize": "dynamic: resample binary images from the grey levels every batch (Bernoulli only)",
    "epochs": "maximum number of epochs",
    "batch_size": "images per optimisation step (per process under torchrun)",
    "lr": "Adam learning rate",
    "weight_decay": "Adam weight decay (L2)",
    "grad_clip": "clip the gradient norm to this value",
    "ema_decay": "if > 0, keep an exponential moving average of the weights and evaluate/export it",
    "patience": "stop after this many epochs without a better validation score",
    "select_on": "validation score for early stopping and best.pt: elbo or iwae",
    "val_iw_samples": "k for the validation IWAE bound",
    "val_fraction": "fraction of the training images held out for validation",
    "calibration_fraction": "fraction of the training images held out of training and model selection "
                            "for the conformal calibration of anomaly scores (0: calibrate on validation)",
    "calibration_min": "at least this many calibration images: p-values cannot go below 1/(n+1), so 99 "
                       "are needed to flag anything at alpha = 0.01",
    "augment_prob": "probability of a small random affine transform of each training image",
    "augment_rotation": "augmentation: maximum rotation in degrees",
    "augment_translation": "augmentation: maximum shift in pixels",
    "augment_scale": "augmentation: maximum relative scale change",
    "perturb_rate": "background model (Ren et al. 2019): replace pixels with uniform noise at this rate",
    "init_from": "start from this checkpoint's (EMA) weights (e.g. IWAE fine-tuning)",
    "subset": "train on only this many images (quick runs)",
    "image_height": "folder:DIR data: resize images to this height",
    "image_width": "folder:DIR data: resize images to this width",
    "color_mode": "folder:DIR data: L (grey, 1 channel) or RGB (3 channels)",
    "seed": "random seed (data split, initialisation, sampling)",
    "device": "auto (CUDA if present) | cpu | cuda | cuda:N",
    "threads": "torch CPU threads",
    "progress": "show a progress bar",
}
MODEL_HELP = {
    "latent_dim": "dimension of z",
    "architecture": "mlp | conv | linear (probabilistic PCA, needs --likelihood gaussian)",
    "likelihood": "bernoulli | gaussian",
    "gaussian_variance": "fixed | global (learned scalar) | pixel (learned per pixel)",
    "fixed_std": "sigma of p(x|z) when the variance is fixed (also the initial value)",
    "hidden_dim": "width of the fully connected layers",
    "channels": "base width of the conv layers",
    "dropout": "dropout probability on hidden layers",
}
# --model vqvae (training/train_vq.py): the options the VAE's flags above do not already name
VQ_TRAIN_HELP = {
    "prior_epochs": "VQ-VAE: maximum epochs of the PixelCNN prior",
    "prior_lr": "VQ-VAE: Adam learning rate of the prior",
    "prior_patience": "VQ-VAE: stop the prior after this many epochs without a better validation log p(z)",
}
VQ_MODEL_HELP = {
    "codebook_size": "VQ-VAE: K, the number of codebook entries",
    "code_dim": "VQ-VAE: D, the length of each codebook vector",
    "commitment": "VQ-VAE: beta of the commitment loss",
    "codebook_decay": "VQ-VAE: EMA decay of the codebook",
    "dead_code_threshold": "VQ-VAE: restart an entry whose EMA count per batch falls below this",
    "prior_channels": "VQ-VAE: channels of the gated PixelCNN prior",
    "prior_layers": "VQ-VAE: gated layers of the prior",
    "prior_kernel": "VQ-VAE: kernel size of the prior's masked convolutions (odd)",
}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One --flag per documented dataclass field, typed from its annotation.

    bool -> --flag/--no-flag, Literal -> choices, int / float / str (also `X | None`) -> that type.
    Defaults stay None so a --config file can fill what the command line leaves out.
    """
    from training.models import literal_choices

    hints = typing.get_type_hints(cls)
    choices = literal_choices(cls)
    for name, f in cls.__dataclass_fields__.items():
        if name not in helps:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{helps[name]} (default: {f.default})"
        hint = hints[name]
        if typing.get_origin(hint) in (types.UnionType, typing.Union):  # int | None -> int
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name in choices:
            parser.add_argument(flag, choices=choices[name], default=None, help=help_text)
        elif hint in (int, float, str):
            parser.add_argument(flag, type=hint, default=None, help=help_text)
        else:  # e.g. tuples: not settable from the command line (input_shape comes from the data)
            raise TypeError(f"no command-line option for {cls.__name__}.{name}: {hint}")


def build_parser() -> argparse.ArgumentParser:
    from training.models import ModelConfig
    from training.train import TrainConfig
    from training.train_vq import VQTrainConfig
    from training.vqvae import VQConfig

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    # No ArgumentDefaultsHelpFormatter: the argparse defaults are None (so --config can fill them) and
    # the help texts already name the real defaults.
    tr = sub.add_parser("train", help="train a model (use torchrun for several processes)")
    tr.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (flags override it)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    tr.add_argument("--model", choices=["vae", "vqvae"], default=None,
                    help="model family: vae (Gaussian latent; every --architecture) or vqvae (discrete codes "
                         "with a PixelCNN prior); default: the --config file's `family`, else vae")
    _add_dataclass_options(tr, TrainConfig, TRAIN_HELP)
    _add_dataclass_options(tr, ModelConfig, MODEL_HELP)
    _add_dataclass_options(tr, VQTrainConfig, VQ_TRAIN_HELP)
    _add_dataclass_options(tr, VQConfig, VQ_MODEL_HELP)

    ev = sub.add_parser("evaluate", help="test-set metrics, figures and report of a checkpoint")
    ev.add_argument("checkpoint", type=Path,
                    help="best.pt or last.pt of a run, or an exported models/NAME/VERSION folder (then only "
                         "sample quality and --amortization-gap are measured, into its report)")
    ev.add_argument("--out-dir", type=Path,
                    help="where report.json, report.md, figures/ go (default: RUN/report)")
    ev.add_argument("--k", type=int, default=5000,
                    help="importance samples for the NLL (5000 as in the IWAE paper)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--data", help="where the training data is now, if it moved (e.g. folder:/data/shapes)")
    ev.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    ev.add_argument("--no-sample-quality", action="store_true",
                    help="skip the FID of 1000 samples and their class shares (trains a digit classifier)")
    ev.add_argument("--classifier-cache", type=Path,
                    help="a .pt file for the FID's feature classifier: reused if present, else written")
    ev.add_argument("--amortization-gap", type=int, default=0, metavar="N",
                    help="Gaussian-latent models: fit q* per image for N test digits and report the "
                         "amortization and approximation gaps (Cremer et al. 2018)")
    ev.add_argument("--binarization", choices=["stochastic", "threshold"], default="stochastic",
                    help="Bernoulli models: binarize the test set stochastically once (seed 0, the IWAE "
                         "paper's protocol) or at 0.5 (what the service does)")

    ex = sub.add_parser("export", help="write models/NAME/VERSION with TorchScript, ONNX and manifest.json")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("--models-dir", type=Path, default=Path("models"))
    ex.add_argument("--name", required=True, help="model name, e.g. mnist-vae ([a-z0-9-_.])")
    ex.add_argument("--version", default="1")
    ex.add_argument("--report-dir", type=Path,
                    help="evaluation output to include (default: RUN/report if present)")
    ex.add_argument("--calibration-k", type=int, default=256, help="k for the anomaly-score calibration")
    ex.add_argument("--force", action="store_true", help="replace an existing version")
    ex.add_argument("--background", type=Path, help="checkpoint of a likelihood-ratio background model "
                                                    "(exported as background_log_weights)")
    ex.add_argument("--anomaly-method", default="auto",
                    help="default anomaly score recorded in the manifest: auto (the best worst-case AUROC of "
                         "the OOD suite on the validation split; see ood-eval) or a method name")
    ex.add_argument("--alpha", type=float, default=0.01,
                    help="suggested anomaly level written into the manifest (default 0.01); the calibration "
                         "split must have at least 1/alpha - 1 images")
    ex.add_argument("--parity-tolerance", type=float, default=1.0,
                    help="multiply every export parity bound by this factor (default 1), for a model whose "
                         "float32 rounding is legitimately larger; recorded in the manifest")
    ex.add_argument("--selection-per-shift", type=int, default=100,
                    help="--anomaly-method auto: images per shift of the validation suite (default 100)")
    ex.add_argument("--data", help="where the training data is now, if it moved (e.g. folder:/data/shapes)")

    from training.calibrate import add_parser as add_calibrate_parser
    from training.ood import add_parser as add_ood_parser
    from training.shapes import add_parser as add_shapes_parser

    add_ood_parser(sub)
    add_calibrate_parser(sub)
    add_shapes_parser(sub)

    at = sub.add_parser("attach-report", help="replace an artifact's report/ (e.g. after ood-eval added its "
                                              "table) without re-exporting; checksums and metrics follow")
    at.add_argument("artifact", type=Path, help="an exported version folder, e.g. models/mnist-vqvae/1")
    at.add_argument("report", type=Path, help="the report folder to copy in (report.json, report.md, ...)")

    tri = sub.add_parser("triton-repo", help="write an NVIDIA Triton model repository from exported models "
                                             "(docs/triton-and-kserve.md)")
    tri.add_argument("--models-dir", type=Path, default=Path("models"))
    tri.add_argument("--out", type=Path, required=True, help="repository folder to write")
    tri.add_argument("--models", default="", help="comma-separated name or name:version (default: the latest "
                                                  "version of every model)")
    tri.add_argument("--instance-kind", choices=["gpu", "cpu"], default="gpu", help="KIND_GPU or KIND_CPU")
    tri.add_argument("--instance-count", type=int, default=1, help="model instances per device")
    tri.add_argument("--max-batch-size", type=int, default=64, help="rows per batch (default: 64)")
    tri.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching delay (2000)")
    tri.add_argument("--max-queue-size", type=int, default=1024, help="queued requests before rejection")
    tri.add_argument("--timeout-us", type=int, default=30_000_000,
                     help="queue timeout per request, REJECT when reached (default 30 s; 0 = none)")
    tri.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig | VQTrainConfig:
    """The run's config: the --config file (its `family` picks the class unless --model does), then flags."""
    from training.models import ModelConfig
    from training.train import TrainConfig
    from training.train_vq import VQTrainConfig
    from training.vqvae import VQConfig

    raw: dict = json.loads(args.config.read_text()) if args.config else {}
    family = args.model or raw.pop("family", "vae")
    raw.pop("family", None)
    config_cls, model_cls = (VQTrainConfig, VQConfig) if family == "vqvae" else (TrainConfig, ModelConfig)
    model_raw = dict(raw.pop("model", {}))
    given = {name: getattr(args, name) for name in vars(args)
             if getattr(args, name) is not None and name not in ("config", "resume", "model", "command")}
    unused = set(given) - set(config_cls.__dataclass_fields__) - set(model_cls.__dataclass_fields__)
    if unused:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(unused))
        raise ValueError(f"{flags} do(es) not apply to --model {family}")
    for name, value in given.items():
        if name in config_cls.__dataclass_fields__:
            raw[name] = value
        else:
            model_raw[name] = value
    return config_cls.from_dict({**raw, "model": model_raw})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from training.train import train
            from training.train_vq import VQTrainConfig, train_vq

            config = _train_config(args)
            trainer = train_vq if isinstance(config, VQTrainConfig) else train
            best = trainer(config, resume=args.resume)
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, say it once
                print(best)
        elif args.command == "evaluate":
            from training.evaluate import evaluate, json_safe
            from training.pipeline import is_vq_checkpoint, splits_for_checkpoint

            out = args.out_dir or args.checkpoint.parent / "report"
            metrics = args.checkpoint.parent / "metrics.jsonl"
            if (args.checkpoint / "manifest.json").is_file():  # an exported artifact: its report grows
                from training.artifact_eval import evaluate_artifact

                report = evaluate_artifact(args.checkpoint, k=args.k, seed=args.seed,
                                           amortization_images=args.amortization_gap,
                                           sample_quality=not args.no_sample_quality,
                                           classifier_cache=args.classifier_cache, data=args.data)
            elif is_vq_checkpoint(args.checkpoint):
                from training.evaluate_vq import evaluate_vq
                from training.train_vq import model_from_checkpoint as vq_from_checkpoint

                if args.amortization_gap:
                    raise ValueError("--amortization-gap is for Gaussian-latent models (a VQ-VAE's "
                                     "posterior is a point mass)")
                model, ckpt = vq_from_checkpoint(args.checkpoint)
                report = evaluate_vq(model, splits_for_checkpoint(ckpt, args.data), out, k=args.k,
                                     seed=args.seed, metrics_path=metrics, figures=not args.no_figures,
                                     classifier_cache=args.classifier_cache)
            else:
                from training.train import model_from_checkpoint

                vae, ckpt = model_from_checkpoint(args.checkpoint)
                report = evaluate(vae, splits_for_checkpoint(ckpt, args.data), out, k=args.k, seed=args.seed,
                                  metrics_path=metrics, figures=not args.no_figures,
                                  binarization=args.binarization, sample_quality=not args.no_sample_quality,
                                  amortization_images=args.amortization_gap,
                                  classifier_cache=args.classifier_cache)
            scalars = {k: v for k, v in report.items()
                       if not isinstance(v, list | dict) or k in ("sample_quality", "amortization")}
            print(json.dumps(json_safe(scalars), indent=2))
        elif args.command == "export":
            from training.pipeline import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.models_dir, args.name, args.version,
                                    report_dir=args.report_dir, calibration_k=args.calibration_k,
                                    force=args.force, background=args.background,
                                    anomaly_method=args.anomaly_method, alpha=args.alpha,
                                    parity_tolerance=args.parity_tolerance,
                                    selection_per_shift=args.selection_per_shift, data=args.data))
        elif args.command == "ood-eval":
            from training.ood import main_from_args

            main_from_args(args)
        elif args.command == "make-shapes":
            from training.shapes import main_from_args as shapes_from_args

            shapes_from_args(args)
        elif args.command == "calibrate":
            from training.calibrate import main_from_args as calibrate_from_args

            calibrate_from_args(args)
        elif args.command == "attach-report":
            from training.artifact_eval import attach_report

            attach_report(args.artifact, args.report)
            print(args.artifact / "report")
        elif args.command == "triton-repo":
            from training.triton_repo import TritonOptions, export_triton_repo

            options = TritonOptions(args.instance_kind, args.instance_count, args.max_batch_size,
                                    args.max_queue_delay_us, args.max_queue_size, args.timeout_us)
            refs = [ref.strip() for ref in args.models.split(",") if ref.strip()]
            names = export_triton_repo(args.models_dir, args.out, refs, options, force=args.force)
            print(f"{args.out}: {', '.join(names)}")
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from training.export import ExportError

        if not isinstance(exc, ExportError):
            raise
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
