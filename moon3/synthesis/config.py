"""Configuration of trace synthesis (``params.yaml`` section ``synthesis``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SynthesisConfig:
    """Which teacher writes the traces, how it is called, and the trace gate's rules."""

    teacher: str = field(
        default="attributes",
        metadata={
            "help": "attributes (offline, from the catalog's structured data) | openai (an OpenAI-compatible "
            "endpoint) | hf (a local Qwen-VL model folder, synthesis.hf_model) | none (skip)."
        },
    )
    out_dir: str = field(default="data/traces", metadata={"help": "traces.parquet (accepted traces) goes here."})
    report_dir: str = field(
        default="reports/synthesis", metadata={"help": "synthesis_report.json, rejected.parquet and the HTML report."}
    )
    cache_path: str = field(
        default=".cache/moon3/synthesis.sqlite",
        metadata={"help": "Content-addressed SQLite cache of teacher answers (a re-run asks nothing twice)."},
    )
    products: bool = field(default=True, metadata={"help": "Write traces for training products."})
    queries: bool = field(default=True, metadata={"help": "Write traces for training queries."})
    seed: int = field(
        default=0, metadata={"help": "Seed of the attributes teacher's phrasing and of the hf teacher's sampling."}
    )
    vary_order: bool = field(
        default=False, metadata={"help": "attributes teacher: shuffle the attribute lines per item (harder to learn)."}
    )
    openai_base_url: str = field(
        default="http://127.0.0.1:8000/v1", metadata={"help": "OpenAI-compatible endpoint (vLLM, TGI, hosted)."}
    )
    openai_model: str = field(default="", metadata={"help": "Model name the endpoint serves."})
    openai_token_env: str = field(
        default="",
        metadata={
            "help": "Name of the environment variable holding the endpoint's key, e.g. OPENAI_API_KEY ('' = send "
            "no key, as for a local vLLM). The key itself is read at call time and never stored or logged."
        },
    )
    hf_model: str = field(
        default="",
        metadata={"help": "hf teacher: local folder or gs:// URI of an HF image-text-to-text model (e.g. Qwen2.5-VL)."},
    )
    hf_batch_size: int = field(
        default=8,
        metadata={"help": "hf teacher: items per generate call (batches fill only if concurrency >= this)."},
    )
    hf_device: str = field(
        default="auto", metadata={"help": "hf teacher: auto (cuda if available, else cpu) | cpu | cuda | cuda:N."}
    )
    hf_trust_remote_code: bool = field(
        default=False,
        metadata={"help": "hf teacher: run the folder's own model code (only this setting can allow it)."},
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Teacher sampling temperature (hf teacher: 0 = greedy decoding)."}
    )
    max_tokens: int = field(
        default=256, metadata={"help": "Teacher answer budget in its own tokens (hf teacher: max_new_tokens)."}
    )
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    timeout_s: float = field(default=60.0, metadata={"help": "Per-request timeout in seconds."})
    max_retries: int = field(default=5, metadata={"help": "Retries on 429, 5xx, timeouts and dropped connections."})
    backoff_base_s: float = field(default=0.5, metadata={"help": "First retry wait; doubles each retry (jittered)."})
    backoff_max_s: float = field(default=30.0, metadata={"help": "Longest wait between retries (Retry-After too)."})
    min_grounded_score: float = field(
        default=1.0,
        metadata={"help": "Trace gate: minimum share of a trace's claims that match the item's known data."},
    )
