"""Experiment config: one YAML file, ``key=value`` overrides, validated once into typed models.

Everything inside Signpost takes these models, never raw dicts. A bad key or value is a ``ConfigError`` that names
the key, the file and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LAYOUTS = ("auto", "gtsrb", "torchvision", "kaggle", "imagefolder")
# An experiment's and a registered model's name: also a folder-name prefix, and inside a models:/<name>@<alias> URI
# (MLflow refuses '/' and ':' in registered model names).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A device's id in the fleet (and the prediction log's device_id column): a name of at most 100 characters.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
# What the config holds of a device's API key: its SHA-256, as 64 lowercase hex digits, never the key itself.
KEY_HASH_PATTERN = r"^[0-9a-f]{64}$"
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
KeyHash = Annotated[str, Field(pattern=KEY_HASH_PATTERN)]
# The largest batch the exported model forms accept (their dynamic batch dimension runs 1 to MAX_BATCH). It lives
# here, where torch is not imported, so that serve.max_batch_size has the same bound as runtime.MAX_BATCH.
MAX_BATCH = 1024


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class SyntheticConfig(StrictModel):
    """The synthetic GTSRB-layout dataset used by tests and the offline demo."""

    num_classes: int = Field(43, ge=2, le=43, description="classes drawn, the first N of GTSRB's 43")
    min_tracks: int = Field(2, ge=1, description="training tracks of the rarest class")
    max_tracks: int = Field(8, ge=1, description="training tracks of the most common class")
    frames_per_track: int = Field(10, ge=1, le=60, description="frames per track (GTSRB has 30)")
    test_tracks: int = Field(2, ge=1, description="test tracks per class")
    min_size: int = Field(15, ge=15, description="smallest image side in pixels")
    max_size: int = Field(250, le=250, description="largest image side in pixels")
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> SyntheticConfig:
        if self.max_tracks < self.min_tracks:
            raise ValueError(f"max_tracks ({self.max_tracks}) must be >= min_tracks ({self.min_tracks})")
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        return self


def _check_store_url(url: str) -> str:
    """An fsspec URL with a scheme and no credentials in it: those come from the environment, never the config."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not rest:
        raise ValueError(f"{url!r} is not a URL: give one with its scheme, e.g. https://…, s3://bucket/…, file:///…")
    # user:secret@ in the authority; a bare name@ is no secret (abfs://container@account.dfs.core.windows.net/…)
    if ":" in rest.split("/", 1)[0].rpartition("@")[0]:
        raise ValueError(f"{scheme}://… holds credentials: take them out of the config and set them in the environment "
                         "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*), as the scheme's fsspec backend "
                         "reads them")
    return url


class ArchivePin(StrictModel):
    """One archive of a dataset, named by where it lives and pinned by its content."""

    url: str = Field(description="an fsspec URL: https://, http://, s3://, gs://, az://, file://, memory://")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="the archive's SHA-256, lower-case hex")
    md5: str | None = Field(
        None, pattern=r"^[0-9a-f]{32}$", description="instead of sha256, for archives whose publisher gives only "
        "an MD5 (the official GTSRB ones); pin your own archives by sha256"
    )

    @model_validator(mode="after")
    def _one_pin(self) -> ArchivePin:
        _check_store_url(self.url)
        if (self.sha256 is None) == (self.md5 is None):
            raise ValueError(f"archive {self.url}: give exactly one of sha256 (`sha256sum FILE`) or md5")
        return self

    @property
    def checksum(self) -> str:
        """The pin as ``"sha256:<hex>"`` (or ``"md5:<hex>"``)."""
        return f"sha256:{self.sha256}" if self.sha256 else f"md5:{self.md5}"


# The official GTSRB archives, with the MD5s their publishers give (they publish no SHA-256).
_GTSRB_SERVER = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370"
GTSRB_ARCHIVES = (
    ("GTSRB_Final_Training_Images.zip", "f33fd80ac59bff73c82d25ab499e03a3"),
    ("GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185"),
    ("GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5"),
)


class FeedbackDataConfig(StrictModel):
    """How ``prepare`` folds labelled feedback batches (``signpost feedback add``) into a new data version."""

    enabled: bool = Field(True, description="fold this experiment's feedback batches into the prepared data")
    holdout: float = Field(
        0.3, ge=0.0, lt=1.0,
        description="share of feedback images (chosen by content hash, so stable) kept out of training: the "
        "`feedback` split that champion and challenger are compared on",
    )
    repeat: int = Field(
        4, ge=1, le=100, description="times each training feedback image appears in the train split (they are few)"
    )
    url: str | None = Field(
        None, description="an fsspec URL of a folder shared by the team (s3://bucket/feedback, file:///mnt/…): "
        "`feedback add` also copies each batch there, and prepare first copies in this experiment's batches it does "
        "not have; credentials from the environment"
    )

    @model_validator(mode="after")
    def _store_url(self) -> FeedbackDataConfig:
        if self.url is not None:
            _check_store_url(self.url)
        return self


class DataConfig(StrictModel):
    """Where the raw dataset comes from and how ``prepare`` turns it into a tensor cache."""

    source: Literal["local", "download", "synthetic"] = Field(
        "local", description="read `root` as it is, fetch `archives` into `root` and unpack them, or generate"
    )
    root: Path = Field(Path("data/gtsrb"), description="folder holding the raw dataset")
    layout: Literal["auto", "gtsrb", "torchvision", "kaggle", "imagefolder"] = "auto"
    image_size: int = Field(32, ge=8, le=512, description="side of the square images in the cache, pixels")
    roi_crops: bool = Field(
        False, description="train on each training image's sign region (ROI, from the dataset's CSV files) grown by "
        "roi_margin, beside the whole frame; the model is always validated, tested and served on whole frames, "
        "decoded as the server decodes an upload"
    )
    roi_margin: float = Field(
        0.0, ge=0.0, le=1.0, description="context kept around the ROI in the roi_crops training images, as a "
        "fraction of the ROI's size"
    )
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="share of training images held out, by track")
    test_fraction: float = Field(
        0.15, gt=0.0, lt=1.0, description="share held out for test when the layout has no test split"
    )
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="prepare fails when more images than this are unreadable"
    )
    workers: int = Field(0, ge=0, description="decode processes; 0 means one per CPU core")
    archives: list[ArchivePin] = Field(
        default_factory=lambda: [ArchivePin(url=f"{_GTSRB_SERVER}/{name}", md5=md5) for name, md5 in GTSRB_ARCHIVES],
        min_length=1,
        description="source: download: the dataset's archives, each {url, sha256}, unpacked into one folder in "
        "order; default: the official GTSRB archives",
    )
    base_url: str | None = Field(
        None, description="a mirror: fetch each archive from <base_url>/<the file name in its url> instead; the pins "
        "are verified whatever the URL",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    feedback: FeedbackDataConfig = Field(default_factory=FeedbackDataConfig)

    @model_validator(mode="after")
    def _mirror_url(self) -> DataConfig:
        if self.base_url is not None:
            _check_store_url(self.base_url)
        return self


class AugmentConfig(StrictModel):
    """Whole-batch augmentation, done as tensor ops on the training device. No flips: they change a sign's meaning."""

    enabled: bool = True
    translate: float = Field(0.1, ge=0.0, le=0.5, description="largest shift, as a fraction of the image side")
    scale_min: float = Field(0.9, gt=0.0, le=1.0, description="smallest zoom factor")
    scale_max: float = Field(1.1, ge=1.0, le=2.0, description="largest zoom factor")
    rotate_deg: float = Field(10.0, ge=0.0, le=45.0, description="largest rotation either way, degrees")
    brightness: float = Field(0.3, ge=0.0, le=1.0, description="brightness factor drawn from 1 ± this")
    contrast: float = Field(0.3, ge=0.0, le=1.0, description="contrast factor drawn from 1 ± this")
    saturation: float = Field(0.3, ge=0.0, le=1.0, description="saturation factor drawn from 1 ± this")
    blur_prob: float = Field(0.1, ge=0.0, le=1.0, description="share of images given a 3x3 Gaussian blur")


class TrainConfig(StrictModel):
    """The training recipe."""

    model: Literal["signnet", "traffic_sign_net"] = Field("signnet", description="architecture, by name")
    epochs: int = Field(12, ge=1, le=1000)
    min_steps: int = Field(
        0, ge=0, le=1_000_000, description="train for at least this many optimizer steps: a dataset too small for "
        "`epochs` gets more epochs (warm-up and cosine stretched to match, said in the log and the model card); "
        "0: `epochs` as given"
    )
    batch_size: int = Field(256, ge=1, le=65536, description="images per optimizer step, across all ranks")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="peak learning rate")
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (Nesterov)")
    schedule: Literal["cosine", "onecycle"] = Field("cosine", description="after a linear warm-up")
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear warm-up length, in epochs")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global gradient norm; 0 turns clipping off")
    bf16: Literal["auto", "on", "off"] = Field("auto", description="bf16 autocast: auto = where it is fast")
    channels_last: bool = True
    compile: bool = Field(False, description="torch.compile the model (pays off on GPUs, not on small CPUs)")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 keeps torch's default")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class EvaluateConfig(StrictModel):
    """The evaluation gate: a model that fails any rule is not registered or promoted."""

    min_accuracy: float = Field(0.9, ge=0.0, le=1.0, description="minimum top-1 test accuracy")
    min_class_accuracy: float = Field(0.5, ge=0.0, le=1.0, description="minimum recall of every class")
    max_drop: float = Field(0.005, ge=0.0, le=1.0, description="largest top-1 drop allowed against the champion")
    promote: bool = Field(
        True,
        description="`signpost run` promotes a challenger that beats the champion by promote_margin (the first "
        "model to pass the gate becomes champion); false: promote by hand with `signpost promote`",
    )
    register_challenger: bool = Field(
        True,
        description="register a model that passes the gate as the registry's challenger; false (a pull request's "
        "run): read the champion and score it on the same test data, register and promote nothing",
    )
    promote_margin: float = Field(
        0.0, ge=0.0, le=1.0,
        description="top-1 lead the challenger needs over the champion, both scored on the same data: on the "
        "held-out feedback when the data has some, else on the test split (0: any lead; a tie keeps the champion)",
    )
    calibration_bins: int = Field(15, ge=2, le=100, description="bins of the reliability diagram and ECE")
    max_served_gap: float = Field(
        0.3, ge=0.0, le=100.0,
        description="`signpost evaluate --served URL` fails when the running server's top-1 on the test files and "
        "evaluate's own differ by more than this, in percentage points",
    )


class PruneConfig(StrictModel):
    """Structured channel pruning: whole conv channels removed (smaller tensors), then fine-tuning."""

    enabled: bool = True
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of each prunable conv's channels removed")
    finetune_epochs: int = Field(5, ge=0, le=1000)
    finetune_lr: float = Field(1e-3, gt=0.0, le=10.0, description="peak learning rate of the fine-tuning")


class DistillConfig(StrictModel):
    """Knowledge distillation into a narrower signnet, compared with the same student trained alone."""

    enabled: bool = True
    student_widths: list[int] = Field([16, 24, 48, 64], min_length=4, max_length=4, description="signnet widths")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="softens teacher and student logits")
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the distillation term; 1 - alpha: labels")
    epochs: int | None = Field(None, ge=1, le=1000, description="student epochs; default: train.epochs")


class OptimizeConfig(StrictModel):
    """Which optimized variants of a trained model to make, and the accuracy they may lose."""

    enabled: bool = Field(True, description="false: `signpost run` stops after evaluate")
    int8: bool = Field(True, description="static int8 post-training quantization (torchao PT2E, Inductor)")
    calibration_batches: int = Field(8, ge=1, le=10000, description="training batches that calibrate int8")
    calibration_batch_size: int = Field(64, ge=1, le=4096)
    dynamic_int8: bool = Field(True, description="dynamic int8 on the Linear layers (torchao), where there are any")
    prune: PruneConfig = Field(default_factory=PruneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export_aoti: bool = Field(True, description="an AOTInductor package (.pt2) of each variant, dynamic batch")
    aoti_bf16: bool = Field(
        True, description="with export_aoti, a second package of each float variant compiled under bf16 autocast"
    )
    export_onnx: bool = Field(True, description="an ONNX file of each float variant, dynamic batch")
    export_executorch: bool = Field(True, description="an ExecuTorch program (.pte, XNNPACK) of each variant: fp32, "
                                    "or int8 by the XNNPACK quantizer; what an edge bundle carries")
    export_openvino: bool = Field(True, description="an OpenVINO IR of each variant: f32, or int8 by NNCF")
    accuracy_budget: float = Field(
        0.005, ge=0.0, le=1.0, description="largest test top-1 drop a variant may have against its parent"
    )


class BenchConfig(StrictModel):
    """The benchmark matrix: variants x runtimes x math settings x batch sizes, each setting in a fresh process."""

    enabled: bool = Field(True, description="false: `signpost run` skips the benchmark")
    variants: list[str] | None = Field(None, description="variant names to measure; default: every candidate")
    include_rejected: bool = Field(
        False, description="also time the variants optimize rejected (over the accuracy budget); they are never the "
        "deployable choice"
    )
    runtimes: list[Literal["eager", "compile", "aoti", "onnxruntime", "executorch", "openvino"]] = [
        "eager", "compile", "aoti", "onnxruntime", "executorch", "openvino"]
    math: list[Literal["default", "bf16", "no-onednn"]] = Field(
        ["default", "bf16", "no-onednn"],
        description="default: fp32 with oneDNN; bf16: DNNL_DEFAULT_FPMATH_MODE=BF16 (+ bf16 autocast for compile); "
        "no-onednn: torch.backends.mkldnn off",
    )
    threads: list[int] = Field([2], min_length=1, description="intra-op threads of each measurement")
    batch_sizes: list[int] = Field([1, 8, 64, 256], min_length=1)
    min_seconds: float = Field(1.0, gt=0.0, description="measure each batch size at least this long")
    max_seconds: float = Field(6.0, gt=0.0, description="stop repeating after this long even if not stable")
    max_cv: float = Field(0.05, gt=0.0, description="stable: the median's rolling spread below this fraction")
    repeats: int = Field(
        2, ge=0, description="passes over every cell after the first, each cell in a fresh process, every pass in "
        "the opposite order to the one before; each row reports the median run and the min-max across runs; "
        "0: one measurement a cell"
    )
    repeat_seconds: float = Field(
        300.0, gt=0.0, description="no repeat measurement starts after the repeats have taken this long (s)"
    )
    timeout: float = Field(300.0, gt=0.0, description="seconds one subprocess may take before it is failed")
    deploy_batch_size: int = Field(64, ge=1, description="the batch size the deployable choice is made for")


class ServeConfig(StrictModel):
    """The HTTP inference service: batching, limits, and where predictions are logged."""

    host: str = Field("127.0.0.1", description="interface to listen on; 0.0.0.0 inside a container")
    port: int = Field(8000, ge=0, le=65535)
    runtime: Literal["auto", "eager", "compile", "aoti", "onnxruntime", "executorch", "openvino"] = Field(
        "auto", description="auto: the bench candidate's runtime, else ONNX Runtime if the model has ONNX, else eager"
    )
    threads: int | None = Field(None, ge=1, description="intra-op threads for inference; default: all cores")
    batching: bool = Field(True, description="gather concurrent requests into one forward pass")
    max_batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="images in one forward pass")
    max_wait_ms: float = Field(1.0, ge=0.0, description="longest a request waits for others to join its batch")
    max_queue: int = Field(512, ge=1, description="images waiting for a forward pass; beyond it: 503 + Retry-After")
    request_timeout_s: float = Field(10.0, gt=0.0, description="a request still unanswered after this gets 504")
    max_upload_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body")
    max_image_pixels: int = Field(
        2048 * 2048, ge=64, description="largest width x height decoded from one image (a JPEG larger than the model "
        "needs is decoded at 1/2-1/8 scale and counts at that scale); larger: 413"
    )
    decode_workers: int = Field(
        1, ge=1, description="threads decoding large uploads (over 512 x 512 pixels a request), apart from inference"
    )
    max_decode_queue: int = Field(
        8, ge=1, description="large uploads waiting for or in a decode thread; beyond it: 503 + Retry-After"
    )
    max_batch_images: int = Field(64, ge=1, description="images in one /v1/predict/batch request")
    top_k: int = Field(5, ge=1, description="classes listed per prediction (at most the model's)")
    # Slow, idle and vanishing clients: each holds a connection (a file descriptor) until one of these cuts it off.
    header_timeout_s: float = Field(
        10.0, gt=0.0, description="a request's headers must arrive within this, counted from the connection (or the "
        "next request's first byte); slower: 408 and the connection is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, description="an upload must arrive whole within this after its headers (8 MiB in 30 s is "
        "2.2 Mbit/s); slower: 408 and the connection is closed"
    )
    keep_alive_s: float = Field(5.0, gt=0.0, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(
        512, ge=1, description="open connections and requests in progress; a request beyond it gets 503 (keep it "
        "under the open-file limit, `ulimit -n`)"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request head (request line and headers); larger: 431"
    )
    protect_metrics: bool = Field(
        False, description="true: /metrics, /docs, /redoc and /openapi.json need the API key (SIGNPOST_API_KEY) too"
    )
    prediction_log: str | None = Field(
        None, description="SQLAlchemy URL of the prediction log; default: SQLite (WAL) at workdir/serve/predictions.db"
    )
    log_batch_size: int = Field(256, ge=1, description="records written per transaction")
    log_interval_s: float = Field(0.5, gt=0.0, description="longest a record waits before it is written")
    canary_share: float = Field(
        0.1, gt=0.0, lt=1.0, description="canary mode (`serve --canary MODEL`): share of requests the canary answers"
    )
    # The fleet: devices ship their prediction records to POST /v1/predictions/ingest, each with its own key.
    device_keys: dict[DeviceId, KeyHash] = Field(
        default_factory=dict, description="device id -> sha256 hex of its API key (never the key itself); with "
        "device_keys_file: both"
    )
    device_keys_file: Path | None = Field(
        None, description="a YAML/JSON file of device id -> sha256 hex of its key (a mounted Secret); read again "
        "when it changes, so a device is added without a restart"
    )
    max_ingest_records: int = Field(5000, ge=1, description="prediction records in one ingest batch; more: 413")
    max_ingest_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest ingest request body; larger: 413")


class PackageConfig(StrictModel):
    """The container image: its build context, base, platforms and where it is pushed."""

    enabled: bool = Field(True, description="false: `signpost run` writes no build context")
    base_image: str = Field("python:3.11-slim-bookworm", description="a Python 3.11 base (the Dockerfile's BASE_IMAGE)")
    torch_index_url: str = Field(
        "https://download.pytorch.org/whl/cpu", description="where the image's pip finds CPU-only PyTorch wheels"
    )
    platforms: list[str] = Field(["linux/amd64", "linux/arm64"], min_length=1)
    image: str = Field("signpost", description="image name (without registry or tag)")
    build: bool = Field(False, description="`signpost run`: also build the image (docker buildx, buildah or podman)")


# Kubernetes names (DNS-1123 labels) and resource quantities, as the API server checks them.
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"


class CanaryDeployConfig(StrictModel):
    """The challenger beside the champion (`signpost deploy --overlay canary|kserve`, `--promote-canary`)."""

    replicas: int = Field(1, ge=1, description="challenger pods beside the champion's: its share of traffic is "
                          "replicas / (replicas + deploy.replicas)")
    traffic_percent: int = Field(10, ge=1, le=99, description="KServe overlay: canaryTrafficPercent")
    min_requests: int = Field(500, ge=1, description="canary records in the prediction log before a verdict")


class DeployConfig(StrictModel):
    """Kubernetes manifests of the service (`signpost deploy`): names, sizes, autoscaling and the canary."""

    name: str = Field("signpost", max_length=50, pattern=K8S_NAME_PATTERN,
                      description="name of the Deployment, Service, HPA and PDB (the canary adds -canary)")
    namespace: str = Field("default", max_length=63, pattern=K8S_NAME_PATTERN)
    replicas: int = Field(2, ge=1, description="the champion's pods before the autoscaler acts")
    cpu_request: str = Field("500m", pattern=QUANTITY_PATTERN, description="per pod, CPU cores (500m: half a core)")
    cpu_limit: str = Field("2", pattern=QUANTITY_PATTERN)
    memory_request: str = Field("1Gi", pattern=QUANTITY_PATTERN, description="per pod, bytes (1Gi: 1 GiB)")
    memory_limit: str = Field("2Gi", pattern=QUANTITY_PATTERN)
    hpa_min: int = Field(2, ge=1, description="fewest pods the autoscaler keeps")
    hpa_max: int = Field(10, ge=1, description="most pods the autoscaler starts")
    hpa_cpu_percent: int = Field(70, ge=1, le=100, description="average CPU use, % of the request, it scales at")
    api_key_secret: str | None = Field(
        "signpost-api-key", max_length=253, description="Secret whose key `api-key` becomes SIGNPOST_API_KEY "
        "(created by the operator, never rendered); none: the prediction routes are open")
    prediction_log_secret: str | None = Field(
        None, max_length=253, description="Secret whose key `url` becomes SIGNPOST_PREDICTION_LOG: the shared "
        "prediction log (postgresql://...) every pod writes to, which --promote-canary reads; none: each pod logs "
        "to SQLite in its own emptyDir")
    pre_stop_s: int = Field(5, ge=0, le=60, description="a stopping pod waits this long before SIGTERM, so the "
                            "endpoints drop it first")
    rollout_timeout_s: int = Field(300, ge=10, description="`--apply`: longest wait for `kubectl rollout status`")
    canary: CanaryDeployConfig = Field(default_factory=CanaryDeployConfig)

    @model_validator(mode="after")
    def _bounds(self) -> DeployConfig:
        if self.hpa_max < self.hpa_min:
            raise ValueError(f"hpa_max ({self.hpa_max}) must be >= hpa_min ({self.hpa_min})")
        return self


class AlertSinkConfig(StrictModel):
    """Where an alert goes. Secrets never live in the config: it names the environment variables that hold them."""

    kind: Literal["log", "webhook", "slack", "github"]
    url: str | None = Field(None, description="webhook / slack: the URL to POST to")
    secret_env: str = Field("SIGNPOST_WEBHOOK_SECRET", description="webhook: variable holding the HMAC-SHA256 key")
    repository: str | None = Field(None, pattern=r"^[\w.-]+/[\w.-]+$", description="github: owner/name")
    token_env: str = Field("GITHUB_TOKEN", description="github: variable holding the token")
    api_url: str = Field("https://api.github.com", description="github: the REST API root")

    @model_validator(mode="after")
    def _complete(self) -> AlertSinkConfig:
        if self.kind in ("webhook", "slack") and not self.url:
            raise ValueError(f"a {self.kind} alert sink needs a url")
        if self.kind == "github" and not self.repository:
            raise ValueError("a github alert sink needs a repository (owner/name)")
        return self


class MonitorConfig(StrictModel):
    """What `signpost monitor` compares, and when a difference is drift. Defaults follow Evidently's."""

    window: int = Field(5000, ge=1, description="the newest N predictions (unless --since is given)")
    min_window: int = Field(200, ge=1, description="fewer predictions than this: no verdict")
    psi_threshold: float = Field(0.1, gt=0.0, description="population stability index at which a feature drifts")
    js_threshold: float = Field(0.1, gt=0.0, description="Jensen-Shannon distance of the class distribution")
    ks_max_window: int = Field(1000, ge=1, description="up to this many values: KS test; above: normed Wasserstein")
    ks_p_value: float = Field(0.05, gt=0.0, lt=1.0)
    wasserstein_threshold: float = Field(0.1, gt=0.0, description="Wasserstein distance / reference std")
    drift_share: float = Field(0.5, gt=0.0, le=1.0, description="input drift when this share of features drift")
    psi_major: float = Field(0.25, gt=0.0, description="input drift also when one feature's PSI reaches this "
                             "(0.25: the usual 'significant shift')")
    confidence_shift: float = Field(0.1, gt=0.0, description="largest change of the mean confidence")
    latency_p99_ms: float = Field(50.0, gt=0.0, description="the service-level objective for p99 latency")
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0, description="share of prediction requests answered with an "
                                  "error (4xx/5xx) above which the service is unhealthy")
    accuracy_drop: float = Field(0.05, gt=0.0, le=1.0, description="live accuracy this far under the evaluation's")
    cooldown_minutes: float = Field(60.0, ge=0.0, description="one alert per incident and sink within this time")
    alerts: list[AlertSinkConfig] = Field(default_factory=lambda: [AlertSinkConfig(kind="log")])


class TrackingConfig(StrictModel):
    """Experiment tracking and the model registry."""

    backend: Literal["mlflow", "none"] = Field("mlflow", description="none: manifests only, no tracking server")
    uri: str | None = Field(
        None, description="tracking URI; default: MLFLOW_TRACKING_URI, else a SQLite store in the workdir"
    )
    experiment: str | None = Field(None, description="experiment name; default: the config's name")
    registered_model: str | None = Field(
        None, pattern=NAME_PATTERN, description="registry name the gated models are versions of; default: "
        "signpost-<the config's name>, so each experiment has a champion of its own"
    )


class SecurityConfig(StrictModel):
    """Artifact signatures (``signpost.signing``; SECURITY.md). The environment overrides the files: the signing
    key from SIGNPOST_SIGNING_KEY, the public keys from SIGNPOST_PUBLIC_KEYS (PEM text)."""

    signing_key: Path | None = Field(
        None, description="PEM private key the stages sign manifests with (`signpost keys generate`); none: unsigned"
    )
    public_keys: list[Path] = Field(
        default_factory=list, description="PEM public keys trusted to sign models; any set: unsigned models refused"
    )
    allow_unsigned: bool = Field(
        False, description="load unsigned models although a public key is set (local experiments; --allow-unsigned)"
    )


class SignpostConfig(StrictModel):
    """One experiment."""

    name: str = Field("experiment", pattern=NAME_PATTERN)
    seed: int = 0
    workdir: Path = Field(Path("artifacts"), description="where every stage writes its artifacts")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    package: PackageConfig = Field(default_factory=PackageConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)

    @model_validator(mode="after")
    def _registered_model(self) -> SignpostConfig:
        # One registered model per experiment unless the config names one: a digits model must never become a
        # version of the traffic-sign model, nor be gated against its champion.
        if self.tracking.registered_model is None:
            self.tracking.registered_model = f"signpost-{self.name}"
        return self


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> SignpostConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:  # a binary file given as the config is no YAML either
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, not {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        _apply_override(raw, item, source)
    try:
        return SignpostConfig.model_validate(raw)
    except ValidationError as exc:
        from_overrides = {item.partition("=")[0].strip(): item for item in overrides}
        raise ConfigError(_describe(exc, source, from_overrides)) from None


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (paths as strings), for manifests and tracking."""
    return config.model_dump(mode="json")


def save_config(config: SignpostConfig, path: Path) -> None:
    """Write the resolved config as YAML, loadable again with ``load_config``."""
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, for example data.image_size=48")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section ({source})")
        node = child
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node[parts[-1]] = value


def _describe(exc: ValidationError, source: str, from_overrides: dict[str, str]) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "<top level>"
        if key in from_overrides:
            key = f"{key} (from override {from_overrides[key]!r})"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            guess = f"; did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"  {key}: unknown key{guess} Allowed here: {', '.join(allowed)}")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _allowed_keys(section: list[str]) -> list[str]:
    model: type[BaseModel] = SignpostConfig
    for part in section:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
