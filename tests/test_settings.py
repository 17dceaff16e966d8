"""The worker's configuration (src/settings/): defaults, parsing, and the errors that stop startup."""

from __future__ import annotations

import re

import pytest

from src.settings import Settings, SettingsError, load_settings, redact_url

VARIABLES = [field.alias for field in Settings.model_fields.values() if field.alias]

DEFAULTS = {
    "model_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "model_revision": None,
    "model_dir": "/models/sd15",
    "model_url": None,
    "model_sha256": None,
    "model_config_dir": None,
    "model_cache_dir": None,
    "models_dir": None,
    "vae_dir": None,
    "models_preload": None,
    "model_cache_ram_mb": None,
    "vae_id": None,
    "vae_url": None,
    "vae_sha256": None,
    "hf_token": None,
    "civitai_token": None,
    "download_tokens": None,
    "download_token": None,
    "device": "auto",
    "dtype": "auto",
    "max_side": 1024,
    "max_steps": 150,
    "max_images": 4,
    "max_pixels": 1048576,
    "max_upscale_side": 4096,
    "default_steps": 25,
    "default_scheduler": "DPM++ 2M Karras",
    "memory_profile": "auto",
    "gpu_memory_gb": None,
    "generation_timeout_seconds": 300.0,
    "safety_checker": False,
    "concurrency": 1,
    "max_jobs_in_memory": None,
    "fast_mode": False,
    "compile_cache_dir": None,
    "embed_parameters": True,
    "max_response_mb": 20.0,
    "default_clip_skip": 1,
    "embeddings_dir": None,
    "max_prompt_chunks": 8,
    "max_prompt_texts": 64,
    "lora_dir": None,
    "max_loras": 4,
    "lora_cache_mb": 1024.0,
    "controlnet_dir": None,
    "controlnets_to_bake": None,
    "max_controlnets": 2,
    "controlnet_cache_mb": 2048.0,
    "controlnet_preload": None,
    "upscaler_dir": None,
    "upscalers_to_bake": None,
    "upscaler_preload": None,
    "upscaler_cache_mb": 512.0,
    "upscale_tile": 512,
    "upscale_tile_overlap": 32,
    "image_urls": True,
    "image_urls_allow_private": False,
    "max_input_image_mb": 20.0,
    "image_fetch_timeout_seconds": 15.0,
    "download_hosts": None,
    "download_allow_private": "false",
    "max_lora_download_mb": 1000.0,
    "max_model_download_mb": 8000.0,
    "download_timeout_seconds": 600.0,
    "max_downloads": 2,
    "download_cache_dir": None,
    "download_cache_gb": 50.0,
    "bucket_name": None,
    "bucket_endpoint_url": None,
    "bucket_access_key_id": None,
    "bucket_secret_access_key": None,
    "bucket_region": None,
    "bucket_prefix": "",
    "bucket_input_prefix": "inputs/",
    "url_expiry_seconds": 604800,
    "log_level": "INFO",
}


def test_every_setting_has_a_variable() -> None:
    # Each variable is its field's name in capitals, but MODEL_CONFIG: pydantic keeps `model_config` for itself.
    names = {name.upper(): name for name in DEFAULTS} | {
        "MODEL_CONFIG": "model_config_dir",
        "CONTROLNETS": "controlnets_to_bake",
        "UPSCALERS": "upscalers_to_bake",
    }
    del names["MODEL_CONFIG_DIR"], names["CONTROLNETS_TO_BAKE"], names["UPSCALERS_TO_BAKE"]
    assert sorted(VARIABLES) == sorted(names)
    assert all(Settings.model_fields[field].alias == variable for variable, field in names.items())


def test_defaults_from_an_empty_environment() -> None:
    assert load_settings({}).model_dump() == DEFAULTS


def test_unrelated_variables_are_ignored() -> None:
    settings = load_settings({"PATH": "/usr/bin", "HOME": "/root", "max_side": "1000", "RUNPOD_POD_ID": "x"})
    assert settings.model_dump() == DEFAULTS


@pytest.mark.parametrize(
    ("environ", "attribute", "expected"),
    [
        pytest.param({"MAX_SIDE": "768"}, "max_side", 768, id="max-side"),
        pytest.param({"MAX_SIDE": " 768 "}, "max_side", 768, id="max-side-padded"),
        pytest.param({"MAX_STEPS": "50"}, "max_steps", 50, id="max-steps"),
        pytest.param({"MAX_IMAGES": "8"}, "max_images", 8, id="max-images"),
        pytest.param({"MAX_PIXELS": "2097152"}, "max_pixels", 2097152, id="max-pixels"),
        pytest.param({"DEFAULT_STEPS": "30"}, "default_steps", 30, id="default-steps"),
        pytest.param({"DEFAULT_STEPS": "150"}, "default_steps", 150, id="default-steps-at-max"),
        pytest.param({"DEFAULT_SCHEDULER": "Euler a"}, "default_scheduler", "Euler a", id="default-scheduler"),
        pytest.param({"DEVICE": "CPU"}, "device", "cpu", id="device-upper"),
        pytest.param({"DEVICE": " Cuda "}, "device", "cuda", id="device-mixed"),
        pytest.param({"DTYPE": "Float16"}, "dtype", "float16", id="dtype-mixed"),
        pytest.param({"DTYPE": "BFLOAT16"}, "dtype", "bfloat16", id="dtype-upper"),
        pytest.param({"DTYPE": "float32"}, "dtype", "float32", id="dtype-float32"),
        pytest.param({"LOG_LEVEL": "debug"}, "log_level", "DEBUG", id="log-level-lower"),
        pytest.param({"MODEL_ID": "/models/sd15"}, "model_id", "/models/sd15", id="model-id-path"),
        pytest.param({"MODEL_REVISION": "fp16"}, "model_revision", "fp16", id="model-revision"),
    ],
)
def test_value_parses_from_string(environ: dict[str, str], attribute: str, expected: object) -> None:
    assert getattr(load_settings(environ), attribute) == expected


def test_default_steps_may_follow_a_larger_max_steps() -> None:
    settings = load_settings({"MAX_STEPS": "500", "DEFAULT_STEPS": "300"})
    assert (settings.max_steps, settings.default_steps) == (500, 300)


@pytest.mark.parametrize("blank", ["", "   "], ids=["empty", "spaces"])
@pytest.mark.parametrize("variable", VARIABLES)
def test_blank_value_means_default(variable: str, blank: str) -> None:
    assert load_settings({variable: blank}).model_dump() == DEFAULTS


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"DEVICE": "gpu"}, "DEVICE='gpu': must be 'auto', 'cuda' or 'cpu'", id="device"),
        pytest.param({"DTYPE": "half"}, "DTYPE='half': must be 'auto', 'float16', 'bfloat16' or 'float32'", id="dtype"),
        pytest.param({"MAX_SIDE": "1000"}, "MAX_SIDE='1000': must be a multiple of 64", id="max-side-not-64"),
        pytest.param({"MAX_SIDE": "abc"}, "MAX_SIDE='abc': must be a valid integer", id="max-side-not-int"),
        pytest.param({"MAX_SIDE": "0"}, "MAX_SIDE='0': must be greater than or equal to 512", id="max-side-0"),
        pytest.param({"MAX_SIDE": "8192"}, "MAX_SIDE='8192': must be less than or equal to 4096", id="max-side-big"),
        pytest.param({"MAX_STEPS": "0"}, "MAX_STEPS='0': must be greater than or equal to 1", id="max-steps-0"),
        pytest.param({"MAX_IMAGES": "-1"}, "MAX_IMAGES='-1': must be greater than or equal to 1", id="max-images"),
        pytest.param({"MAX_PIXELS": "10"}, "MAX_PIXELS='10': must be greater than or equal to 262144", id="max-pixels"),
        pytest.param({"DEFAULT_STEPS": "0"}, "DEFAULT_STEPS='0': must be greater than or equal to 1", id="steps-0"),
        pytest.param(
            {"DEFAULT_STEPS": "200"}, "DEFAULT_STEPS=200: must not exceed MAX_STEPS=150", id="steps-over-default-max"
        ),
        pytest.param(
            {"MAX_STEPS": "40", "DEFAULT_STEPS": "50"},
            "DEFAULT_STEPS=50: must not exceed MAX_STEPS=40",
            id="steps-over-set-max",
        ),
        pytest.param(
            {"MAX_STEPS": "20"}, "DEFAULT_STEPS=25: must not exceed MAX_STEPS=20", id="default-steps-over-set-max"
        ),
        pytest.param(
            {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD': must be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'", id="log-level"
        ),
    ],
)
def test_bad_value_is_refused(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    message = str(caught.value)
    assert message.startswith("invalid configuration: ")
    assert expected in message


def test_several_bad_variables_in_one_message() -> None:
    environ = {"DEVICE": "gpu", "DTYPE": "half", "MAX_SIDE": "1000", "MAX_IMAGES": "-1", "LOG_LEVEL": "LOUD"}
    with pytest.raises(SettingsError) as caught:
        load_settings(environ)
    message = str(caught.value)
    for variable, value in environ.items():
        assert f"{variable}='{value}'" in message
    assert message.count("; ") == len(environ) - 1


def test_load_settings_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MAX_SIDE", "768")
    monkeypatch.setenv("DEVICE", "CPU")
    settings = load_settings()
    assert settings.max_side == 768
    assert settings.device == "cpu"
    assert settings.max_steps == 150


def test_load_settings_refuses_bad_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    with pytest.raises(SettingsError, match="LOG_LEVEL='LOUD'"):
        load_settings()


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(ValueError, match="frozen"):
        settings.max_side = 2048  # type: ignore[misc]


def test_unknown_default_scheduler_stops_the_worker_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings cannot import the schema's scheduler names, so the worker checks them as it reads the settings."""
    import handler

    monkeypatch.setenv("DEFAULT_SCHEDULER", "foo")
    monkeypatch.setattr(handler, "_settings", None)
    with pytest.raises(SettingsError, match="DEFAULT_SCHEDULER='foo': unknown scheduler; The schedulers are: "):
        handler.get_settings()


def test_bucket_variables_parse() -> None:
    settings = load_settings(
        {
            "BUCKET_NAME": "renders",
            "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000",
            "BUCKET_ACCESS_KEY_ID": "id",
            "BUCKET_SECRET_ACCESS_KEY": "s3cr3t",
            "URL_EXPIRY_SECONDS": "3600",
            "EMBED_PARAMETERS": "false",
            "MAX_RESPONSE_MB": "10",
        }
    )
    assert settings.bucket_configured
    assert settings.bucket_secret_access_key is not None
    assert settings.bucket_secret_access_key.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(settings)
    assert (settings.url_expiry_seconds, settings.embed_parameters, settings.max_response_mb) == (3600, False, 10.0)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"URL_EXPIRY_SECONDS": "604801"}, "URL_EXPIRY_SECONDS='604801'", id="expiry-over-7-days"),
        pytest.param({"BUCKET_ENDPOINT_URL": "minio:9000"}, "must be an http:// or https:// URL", id="endpoint"),
        pytest.param({"BUCKET_ACCESS_KEY_ID": "id"}, "set both or neither", id="key-without-secret"),
        pytest.param({"MAX_RESPONSE_MB": "0"}, "MAX_RESPONSE_MB='0'", id="response-limit-zero"),
        pytest.param({"EMBED_PARAMETERS": "maybe"}, "EMBED_PARAMETERS='maybe'", id="embed-not-boolean"),
    ],
)
def test_bad_bucket_variables_are_refused(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("?", "\\?")):
        load_settings(environ)


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        pytest.param("uploads", "must end with '/'", id="no-slash"),
        pytest.param("/", "a key is at most 1024 characters", id="the-whole-bucket"),
        pytest.param("/uploads/", "none empty, '.' or '..'", id="leading-slash"),
        pytest.param("uploads//", "none empty", id="empty-part"),
        pytest.param("uploads/../", "none empty, '.' or '..'", id="dot-dot"),
        pytest.param("my uploads/", "each of A-Z a-z 0-9", id="space"),
        pytest.param("uploads%2F/", "each of A-Z a-z 0-9", id="percent"),
    ],
)
def test_bucket_input_prefix_must_be_a_plain_folder(prefix: str, problem: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({"BUCKET_INPUT_PREFIX": prefix})

    assert f"BUCKET_INPUT_PREFIX={prefix!r}: " in str(error.value)
    assert problem in str(error.value)
    assert str(error.value).endswith("such as inputs/ or uploads/2026/")


def test_bucket_input_prefix_defaults_to_inputs() -> None:
    assert load_settings({}).bucket_input_prefix == "inputs/"
    assert load_settings({"BUCKET_INPUT_PREFIX": "uploads/2026/"}).bucket_input_prefix == "uploads/2026/"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://[bad", "BUCKET_ENDPOINT_URL='http://[bad': is not a valid URL", id="bracket"),
        pytest.param("http://minio:port", "BUCKET_ENDPOINT_URL='http://minio:port': is not a valid URL", id="port"),
        pytest.param("http://minio:99999", "is not a valid URL", id="port-out-of-range"),
        pytest.param("http://", "BUCKET_ENDPOINT_URL='http://': must name a host", id="no-host"),
        pytest.param("https://:9000", "must name a host", id="port-without-host"),
        pytest.param("https:///bucket", "must name a host", id="path-without-host"),
        pytest.param(
            "https://0123abcd.r2.cloudflarestorage.com/renders",
            "must be the endpoint alone, without a path: the bucket goes in BUCKET_NAME",
            id="bucket-in-the-path",
        ),
        pytest.param("http://minio:9000/?x=1", "must be the endpoint alone", id="query"),
    ],
)
def test_endpoint_must_be_a_url_with_a_host(url: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("[", "\\[")):
        load_settings({"BUCKET_ENDPOINT_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000",
        "http://[::1]:9000",
        "https://s3.us-east-1.amazonaws.com",
        "https://0123abcd.r2.cloudflarestorage.com",
        "http://minio:9000/",
    ],
)
def test_good_endpoints_are_kept(url: str) -> None:
    assert load_settings({"BUCKET_ENDPOINT_URL": url}).bucket_endpoint_url == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("http://admin:hunter2@minio:9000", "'http://<hidden>@minio:9000'", id="user-and-password"),
        pytest.param("https://hunter2@s3.example.com", "'https://<hidden>@s3.example.com'", id="user-only"),
        pytest.param("http://admin:hun/ter2@minio:9000", "'http://<hidden>@minio:9000'", id="slash-in-password"),
        pytest.param("http://admin:hunter2@[bad", "'http://<hidden>@[bad'", id="unparseable"),
    ],
)
def test_endpoint_with_credentials_is_refused_without_echoing_them(url: str, shown: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"BUCKET_ENDPOINT_URL": url})
    message = str(caught.value)
    assert f"BUCKET_ENDPOINT_URL={shown}: " in message
    assert "must not carry credentials; use BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY" in message
    assert "hunter2" not in message
    assert "ter2" not in message
    assert "admin" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "https://h.example/m.safetensors?token=s3cret", "https://h.example/m.safetensors?<hidden>", id="query"
        ),
        pytest.param("https://h.example/m?a=1#frag", "https://h.example/m?<hidden>", id="query-and-fragment"),
        pytest.param("https://h.example/m#s3cret", "https://h.example/m", id="fragment"),
        pytest.param("https://h.example/m?", "https://h.example/m", id="empty-query"),
        pytest.param("https://u:s3cret@h.example/m?t=s3cret", "https://<hidden>@h.example/m?<hidden>", id="both"),
        # The "@" of an e-mail address in the query is not the end of credentials: the query is still hidden.
        pytest.param("https://h.example/m?mail=a@b.example&t=s3cret", "https://h.example/m?<hidden>", id="at-in-query"),
        # A password holding "?": the host and all after it may be credentials.
        pytest.param("https://u:s3?cret@h.example/m", "https://<hidden>", id="question-mark-in-password"),
        pytest.param("not a url ?s3cret", "not a url ?<hidden>", id="no-scheme"),
    ],
)
def test_redact_url_hides_credentials_and_queries(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


@pytest.mark.parametrize("variable", ["MODEL_URL", "VAE_URL"])
def test_a_bad_download_url_is_named_without_its_query(variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: "ftp://h.example/m.safetensors?token=s3cret"})

    assert f"{variable}='ftp://h.example/m.safetensors?<hidden>': must be an http:// or https:// URL" in str(
        caught.value
    )
    assert "s3cret" not in str(caught.value)


def _description(variable: str) -> str:
    [field] = [field for field in Settings.model_fields.values() if field.alias == variable]
    return field.description or ""


@pytest.mark.parametrize("variable", ["MEMORY_PROFILE", "GPU_MEMORY_GB"])
def test_memory_sizes_are_described_in_gib(variable: str) -> None:
    description = _description(variable)
    assert "GiB" in description
    # "GB" alone would be 10^9 bytes; the only GB allowed is inside a product name such as "GTX 1060 6GB".
    assert re.search(r"\bGB\b", description) is None, description


def test_gpu_memory_gb_is_described_as_gib() -> None:
    # src/run/engine.py _gpu_bytes reads GPU_MEMORY_GB as gpu_memory_gb * 2**30 (src.run.memory.GIB).
    assert "in GiB (2^30 bytes)" in _description("GPU_MEMORY_GB")


@pytest.mark.parametrize(
    ("gib", "profile"),
    [
        (10, "high"),
        (9.99, "balanced"),
        (5.93, "balanced"),
        (5.5, "balanced"),
        (5.49, "low"),
        (4, "low"),
        (3.99, "minimal"),
    ],
)
def test_memory_profile_description_matches_choose_profile(gib: float, profile: str) -> None:
    from src.run.memory import GIB, choose_profile

    description = _description("MEMORY_PROFILE")
    assert "`high` 10 GiB or more, `balanced` 5.5 to 10 GiB" in description
    assert "`low` 4 to 5.5 GiB, `minimal` below 4 GiB" in description
    assert GIB == 2**30
    assert choose_profile("cuda", int(gib * GIB)).value == profile


@pytest.mark.parametrize("name", ["s3://renders", "renders/2026", "Renders Bucket", "ab"])
def test_a_bucket_name_is_a_name_alone(name: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({"BUCKET_NAME": name})

    assert f"BUCKET_NAME={name!r}: must be a bucket's name alone" in str(refused.value)


@pytest.mark.parametrize("name", ["renders", "my.renders-2026", "Legacy_Bucket"])
def test_bucket_names_s3_and_its_look_alikes_take_are_kept(name: str) -> None:
    assert load_settings({"BUCKET_NAME": name}).bucket_name == name


@pytest.mark.parametrize(
    "environ",
    [
        {"GPU_MEMORY_GB": "inf"},
        {"GENERATION_TIMEOUT_SECONDS": "inf"},
        {"MAX_RESPONSE_MB": "nan"},
    ],
    ids=["gpu-memory", "timeout", "response"],
)
def test_infinity_and_nan_are_refused(environ: dict[str, str]) -> None:
    [(variable, value)] = environ.items()
    with pytest.raises(SettingsError, match=f"{variable}='{value}'"):
        load_settings(environ)


@pytest.mark.parametrize("item", ["s3cr3t/t0ken=huggingface.co", "https://s3cr3t@host=abc", "s3cr3t+t0ken:x=abc"])
def test_a_malformed_download_token_item_is_refused_without_its_text(item: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings({"DOWNLOAD_TOKENS": item})

    assert "item 1: the part before '=' is not a host, nor host:port" in str(refused.value)
    assert "s3cr3t" not in str(refused.value)


def test_a_bad_secret_is_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"BUCKET_SECRET_ACCESS_KEY": "hunter2", "BUCKET_ACCESS_KEY_ID": "id", "MAX_SIDE": "x"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"MEMORY_PROFILE": "huge"}, "MEMORY_PROFILE='huge'", id="profile"),
        pytest.param({"GPU_MEMORY_GB": "0"}, "GPU_MEMORY_GB='0'", id="gpu-memory-zero"),
        pytest.param({"GENERATION_TIMEOUT_SECONDS": "-1"}, "GENERATION_TIMEOUT_SECONDS='-1'", id="timeout-negative"),
        pytest.param({"SAFETY_CHECKER": "perhaps"}, "SAFETY_CHECKER='perhaps'", id="safety-checker"),
        pytest.param({"CONCURRENCY": "0"}, "CONCURRENCY='0'", id="concurrency-zero"),
        pytest.param({"MAX_JOBS_IN_MEMORY": "0"}, "MAX_JOBS_IN_MEMORY='0'", id="jobs-in-memory-zero"),
        pytest.param(
            {"CONCURRENCY": "2", "MAX_JOBS_IN_MEMORY": "3"},
            "MAX_JOBS_IN_MEMORY=3: must not exceed CONCURRENCY=2",
            id="jobs-in-memory-over-concurrency",
        ),
    ],
)
def test_bad_memory_and_runtime_variables_are_refused(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        load_settings(environ)


def test_memory_and_runtime_variables_parse() -> None:
    settings = load_settings(
        {
            "MEMORY_PROFILE": "Balanced",
            "GPU_MEMORY_GB": "6",
            "GENERATION_TIMEOUT_SECONDS": "0.5",
            "SAFETY_CHECKER": "true",
            "CONCURRENCY": "2",
        }
    )
    assert (settings.memory_profile, settings.gpu_memory_gb, settings.generation_timeout_seconds) == (
        "balanced",
        6.0,
        0.5,
    )
    assert (settings.safety_checker, settings.concurrency) == (True, 2)
    # Unset, as many jobs may hold images in memory as runpod hands the worker.
    assert settings.jobs_in_memory == 2
    assert load_settings({"CONCURRENCY": "4", "MAX_JOBS_IN_MEMORY": "1"}).jobs_in_memory == 1


@pytest.mark.parametrize(
    ("variable", "value", "kept"),
    [
        ("MODEL_URL", "HTTPS://civitai.com/api/download/models/1", "https://civitai.com/api/download/models/1"),
        ("BUCKET_ENDPOINT_URL", "HTTP://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ],
)
def test_a_url_scheme_in_upper_case_is_a_url(variable: str, value: str, kept: str) -> None:
    settings = load_settings({variable: value})

    assert getattr(settings, variable.lower()) == kept
