"""Output formats, parameters inside the files, S3 against a real local server, the size guard."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import piexif
import piexif.helper
import pytest
import requests
from PIL import ExifTags, Image

import handler
from src.settings import SettingsError, load_settings
from src.storage import S3Storage
from tests.conftest import ACCESS_KEY, SECRET, S3Server, decode_png, noise_image

pytestmark = pytest.mark.usefixtures("worker")

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}


def run(job_id: str = "job-1", **fields: object) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": job_id, "input": {"prompt": "a fox", **FAST, **fields}}))


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def user_comment(image: Image.Image) -> str:
    """The parameters of a JPEG or WebP as A1111's ``read_info_from_image`` reads them: with piexif, which takes a
    UserComment typed BYTE (Pillow's own Exif writes that) for numbers, and A1111 then for no parameters."""
    raw = piexif.load(image.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    assert isinstance(raw, bytes), f"typed {type(raw).__name__}: A1111 cannot read it"
    assert raw.startswith(b"UNICODE\x00")
    return str(piexif.helper.UserComment.load(raw))


# --- formats and embedded parameters -------------------------------------------------------


def test_png_carries_a1111_parameters() -> None:
    result = run(seed=77, negative_prompt="blurry", guidance_scale=6.5, scheduler="euler a")

    image = decode_png(result["images"][0]["image"])
    model = result["metadata"]["model"]
    assert image.text["parameters"] == (
        "a fox\nNegative prompt: blurry\n"
        f"Steps: 2, Sampler: Euler a, CFG scale: 6.5, Seed: 77, Size: 64x64, Model: {model}, RNG: CPU"
    )


@pytest.mark.parametrize(
    ("scheduler", "written"),
    [
        ("DPM2", "Sampler: DPM2, Schedule type: Uniform, "),
        ("dpm_2_karras", "Sampler: DPM2 Karras, CFG"),
        ("DPM++ 2M", "Sampler: DPM++ 2M, Schedule type: Uniform, "),
        ("dpmpp_2m_karras", "Sampler: DPM++ 2M Karras, CFG"),
    ],
)
def test_dpm2_on_uniform_names_its_schedule_for_a1111_whose_own_is_karras(scheduler: str, written: str) -> None:
    # A1111 1.9 and later read "Sampler: DPM2" alone as DPM2 on Karras, and "DPM2 Karras" as that pair.
    result = run(scheduler=scheduler)

    assert written in decode_png(result["images"][0]["image"]).text["parameters"]


def test_a_dpm2_hires_pass_names_its_schedule_for_a1111() -> None:
    # Without it, A1111 runs the hires sampler on the first pass's schedule type (Automatic: Karras for DPM2).
    result = run(scheduler="euler", hires={"scale": 1.5, "steps": 1, "sampler": "DPM2"})

    text = decode_png(result["images"][0]["image"]).text["parameters"]
    assert "Hires sampler: DPM2, Hires schedule type: Uniform" in text


def test_each_image_of_a_batch_carries_its_own_seed() -> None:
    result = run(seed=10, num_images=2)

    seeds = [decode_png(item["image"]).text["parameters"].split("Seed: ")[1].split(",")[0] for item in result["images"]]
    assert seeds == ["10", "11"]


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("JPEG", "JPEG")])
def test_lossy_formats_decode_and_carry_parameters_in_exif(output_format: str, pil_format: str) -> None:
    result = run(seed=5, output_format=output_format, width=128)

    image = open_image(base64.b64decode(result["images"][0]["image"]))
    assert image.format == pil_format
    assert image.size == (128, 64)
    assert result["metadata"]["output_format"] == output_format.lower()
    assert "Seed: 5" in user_comment(image)
    assert user_comment(image).startswith("a fox\n")


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_lower_quality_gives_smaller_files(output_format: str) -> None:
    sizes = [
        len(
            base64.b64decode(
                run(seed=3, width=256, height=256, output_format=output_format, output_quality=quality)["images"][0][
                    "image"
                ]
            )
        )
        for quality in (20, 90)
    ]

    assert sizes[0] < sizes[1]


def test_embedding_can_be_turned_off(configure: Callable[..., None]) -> None:
    configure(EMBED_PARAMETERS="false")

    png = decode_png(run()["images"][0]["image"])
    jpeg = open_image(base64.b64decode(run(output_format="jpeg")["images"][0]["image"]))

    assert "parameters" not in png.text
    assert ExifTags.Base.UserComment not in jpeg.getexif().get_ifd(ExifTags.IFD.Exif)


def test_quality_with_png_is_reported_not_dropped_silently() -> None:
    result = run(output_quality=50)

    assert any("output_quality=50" in warning for warning in result["metadata"]["warnings"])


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"output_format": "gif"}, "output_format='gif'"),
        ({"output_quality": 0}, "output_quality=0"),
        ({"output_quality": 101}, "output_quality=101"),
        ({"output_quality": 80.5}, "output_quality=80.5"),
        ({"output_type": "url"}, "output_type='url'"),
        ({"output_type": "s3"}, "output_type='s3': needs a bucket"),
    ],
)
def test_bad_output_fields_are_refused(fields: dict[str, object], named: str) -> None:
    result = run(**fields)

    assert set(result) == {"error"}
    assert named in result["error"]


# --- S3 --------------------------------------------------------------------------------------


def test_upload_then_presigned_get_gives_the_same_bytes(s3_server: S3Server, bucket: str) -> None:
    result = run(job_id="job-get", seed=9, num_images=2, output_type="s3", output_format="webp")

    assert "timings_ms" in result["metadata"]
    assert result["metadata"]["timings_ms"]["upload"] > 0
    for index, item in enumerate(result["images"]):
        assert set(item) == {"url", "bucket", "key", "seed", "format"}
        assert item["bucket"] == bucket
        assert item["key"] == f"test/job-get/{index}-{9 + index}.webp"
        assert item["format"] == "webp"
        response = requests.get(item["url"], timeout=10)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "image/webp"
        stored = s3_server.client().get_object(Bucket=bucket, Key=item["key"])["Body"].read()
        assert response.content == stored
        image = open_image(response.content)
        assert (image.format, image.size) == ("WEBP", (64, 64))
        assert f"Seed: {9 + index}" in user_comment(image)


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_a_result_fed_back_as_an_input_is_read(bucket: str, output_format: str) -> None:
    first = run(job_id="job-first", output_type="s3", output_format=output_format)
    [item] = first["images"]

    again = run(job_id="job-again", image=f"s3://{bucket}/{item['key']}", strength=0.5, output_type="base64")

    assert "error" not in again, again.get("error")
    assert again["metadata"]["task"] == "img2img"


def test_a_refused_s3_input_shows_nothing_and_the_next_job_runs(s3_server: S3Server, bucket: str) -> None:
    secret_file = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="config/secret.env", Body=secret_file)
    client.put_object(Bucket=bucket, Key="inputs/notes.txt", Body=secret_file)

    present = run(image=f"s3://{bucket}/config/secret.env")
    absent = run(image=f"s3://{bucket}/config/absent.env")
    not_an_image = run(image=f"s3://{bucket}/inputs/notes.txt")

    assert present["error"].replace("secret", "absent") == absent["error"]
    assert "BUCKET_INPUT_PREFIX='inputs/'" in present["error"]
    assert "it looks like text" in not_an_image["error"]
    for refused in (present, absent, not_an_image):
        assert set(refused) == {"error"}
        assert "AWS_SECR" not in refused["error"]
        assert "wJalr" not in refused["error"]
    assert "images" in run(output_type="base64")


def test_auto_uploads_when_a_bucket_is_configured(bucket: str) -> None:
    result = run(output_type="auto")

    [item] = result["images"]
    assert item["bucket"] == bucket
    assert requests.get(item["url"], timeout=10).headers["Content-Type"] == "image/png"


def test_base64_stays_inline_even_with_a_bucket(bucket: str) -> None:
    del bucket
    result = run(output_type="base64")

    assert set(result["images"][0]) == {"image", "seed"}
    assert "upload" not in result["metadata"]["timings_ms"]


def test_missing_bucket_fails_s3_and_falls_back_under_auto(s3_server: S3Server, configure: Callable[..., None]) -> None:
    configure(
        BUCKET_NAME="no-such-bucket",
        BUCKET_ENDPOINT_URL=s3_server.url,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
        BUCKET_SECRET_ACCESS_KEY=SECRET,
    )

    failed = run(output_type="s3")
    assert set(failed) == {"error"}
    assert "no-such-bucket" in failed["error"]
    assert s3_server.url in failed["error"]
    assert "NoSuchBucket" in failed["error"]

    fallback = run(output_type="auto", seed=4)
    assert decode_png(fallback["images"][0]["image"]).size == (64, 64)
    assert fallback["images"][0]["seed"] == 4
    [warning] = fallback["metadata"]["warnings"]
    assert "NoSuchBucket" in warning
    assert "returned inline" in warning

    configure(MAX_RESPONSE_MB="0.01")  # and inline, the answer is too large: the refusal says why it is inline
    too_large = run(output_type="auto", seed=4, num_images=2)
    assert set(too_large) == {"error"}
    assert "over MAX_RESPONSE_MB=0.01. The images came back inline because their upload failed" in too_large["error"]
    assert "NoSuchBucket" in too_large["error"]


def _stop_server_at_image(s3_server: S3Server, index: int) -> None:
    """Stop the S3 server once images before ``index`` are stored, as image ``index`` starts uploading.

    The seam is boto3's own event system, on the worker's one S3 client.
    """
    client = handler.get_storage()._client
    stored: set[int] = set()
    earlier_done = threading.Event()

    def stop(params: dict[str, Any], context: dict[str, Any], **_: object) -> None:
        context["image_index"] = this = int(params["Key"].split("/")[-1].split("-")[0])
        if this == index:
            assert earlier_done.wait(timeout=30)
            s3_server.server.stop()

    def note_stored(context: dict[str, Any], **_: object) -> None:
        stored.add(context["image_index"])
        if stored >= set(range(index)):
            earlier_done.set()

    if index == 0:
        earlier_done.set()
    client.meta.events.register("before-parameter-build.s3.PutObject", stop)
    client.meta.events.register("after-call.s3.PutObject", note_stored)


def test_server_stopped_mid_batch_auto_falls_back_with_warnings(s3_server: S3Server, bucket: str) -> None:
    _stop_server_at_image(s3_server, 2)

    result = run(output_type="auto", seed=100, num_images=4)

    images = result["images"]
    assert [item["seed"] for item in images] == [100, 101, 102, 103], "no image lost, order kept"
    assert [set(item) for item in images[:2]] == [{"url", "bucket", "key", "seed", "format"}] * 2
    assert "image" in images[2], "the image whose upload failed is inline"
    inline = [index for index, item in enumerate(images) if "image" in item]
    warnings = result["metadata"]["warnings"]
    assert len(warnings) == len(inline)
    assert all(bucket in warning for warning in warnings)
    for index in inline:
        assert decode_png(images[index]["image"]).size == (64, 64)


def test_server_stopped_mid_batch_s3_is_a_clear_error(s3_server: S3Server, bucket: str) -> None:
    _stop_server_at_image(s3_server, 1)

    result = run(output_type="s3", num_images=3)

    assert set(result) == {"error"}
    assert bucket in result["error"]
    assert s3_server.url in result["error"]
    assert "EndpointConnectionError" in result["error"]


def test_concurrent_jobs_do_not_collide(bucket: str) -> None:
    results: dict[str, dict[str, Any]] = {}

    def job(job_id: str, prompt: str) -> None:
        results[job_id] = asyncio.run(
            handler.handler({"id": job_id, "input": {"prompt": prompt, **FAST, "seed": 1, "output_type": "s3"}})
        )

    threads = [threading.Thread(target=job, args=(f"job-{n}", f"prompt {n}")) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    keys = {results[f"job-{n}"]["images"][0]["key"] for n in range(2)}
    assert keys == {"test/job-0/0-1.png", "test/job-1/0-1.png"}
    for n in range(2):
        fetched = requests.get(results[f"job-{n}"]["images"][0]["url"], timeout=10).content
        assert open_image(fetched).text["parameters"].startswith(f"prompt {n}\n")
    del bucket


def test_secrets_never_reach_logs_errors_or_responses(
    s3_server: S3Server, bucket: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG):
        ok = run(output_type="s3")
        _stop_server_at_image(s3_server, 0)
        failed = run(output_type="s3")
        fallback = run(output_type="auto")
    printed = capfd.readouterr()

    # The check means something only if botocore's DEBUG records (requests, headers, signing) were captured.
    botocore_debug = [
        record for record in caplog.records if record.name.startswith("botocore") and record.levelno == logging.DEBUG
    ]
    assert any("PutObject" in record.getMessage() for record in botocore_debug), "botocore's DEBUG log was captured"
    for captured in (
        caplog.text,
        "\n".join(record.getMessage() for record in caplog.records),
        printed.out,
        printed.err,
        json.dumps(ok),
        json.dumps(failed),
        json.dumps(fallback),
        repr(handler.get_settings()),
    ):
        assert SECRET not in captured
    assert "error" in failed
    assert fallback["metadata"]["warnings"]
    del bucket


def test_a_job_cancelled_before_its_upload_leaves_nothing_in_the_bucket(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    finishing, go_on = threading.Event(), threading.Event()
    real_finish = handler.finish

    def held_finish(*args: Any, **kwargs: Any) -> dict[str, Any]:
        finishing.set()  # the images are made; RunPod cancels the job now
        go_on.wait(60)
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(handler, "finish", held_finish)

    async def cancelled_in_finish() -> None:
        task = asyncio.create_task(
            handler.handler(
                {"id": "job-cancelled", "input": {"prompt": "a fox", **FAST, "num_images": 2, "output_type": "s3"}}
            )
        )
        await asyncio.to_thread(finishing.wait, 120)
        task.cancel()
        await asyncio.sleep(0.1)  # the cancellation reaches the job first
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_in_finish())

    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="test/job-cancelled/")
    assert listed.get("KeyCount") == 0, [item["Key"] for item in listed.get("Contents", [])]
    monkeypatch.setattr(handler, "finish", real_finish)
    assert "images" in run(output_type="s3")


# --- the size guard ----------------------------------------------------------------------------


def test_request_that_cannot_fit_inline_is_refused_before_generating(configure: Callable[..., None]) -> None:
    configure(MAX_RESPONSE_MB="0.5")
    engine = handler.get_engine()
    calls = []
    hook = engine._pipeline.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = run(width=512, height=512, num_images=4)
    finally:
        hook.remove()

    assert set(result) == {"error"}
    assert "MAX_RESPONSE_MB=0.5" in result["error"]
    assert "would be at least" in result["error"]
    assert "jpeg" in result["error"]
    assert "S3" in result["error"]
    assert calls == [], "nothing was generated"


def test_answer_over_the_limit_after_encoding_is_a_clear_error(configure: Callable[..., None]) -> None:
    configure(MAX_RESPONSE_MB="0.01")

    result = run(seed=1)

    assert set(result) == {"error"}
    assert "MAX_RESPONSE_MB=0.01" in result["error"]
    # With its bytes: rounded alone, an answer just over the limit read as equal to it.
    assert re.search(r"the answer is 0\.01 MB \(1[\d,]+ bytes\) inline", result["error"]), result["error"]


def test_an_a1111_answer_echoing_its_images_is_measured_whole(configure: Callable[..., None]) -> None:
    configure(MAX_RESPONSE_MB="0.1")
    picture = io.BytesIO()
    noise_image(192, 192).save(picture, "PNG")  # about 150 KB in base64: the answer's own image is far smaller
    payload = {
        "prompt": "a fox",
        "steps": 2,
        "width": 64,
        "height": 64,
        "init_images": [base64.b64encode(picture.getvalue()).decode("ascii")],
    }

    def img2img(**more: Any) -> dict[str, Any]:
        api = {"method": "POST", "endpoint": "/sdapi/v1/img2img"}
        return asyncio.run(handler.handler({"id": "a1111", "input": {"api": api, "payload": {**payload, **more}}}))

    plain, echoed = img2img(), img2img(include_init_images=True)

    assert "error" not in plain, plain
    assert plain["parameters"]["init_images"] is None
    assert set(echoed) == {"error"}
    assert "over MAX_RESPONSE_MB=0.1" in echoed["error"]


def test_answer_under_the_limit_is_returned(configure: Callable[..., None]) -> None:
    configure(MAX_RESPONSE_MB="0.1")

    result = run(seed=1)

    assert len(result["images"]) == 1


def test_too_large_for_inline_goes_to_s3_under_auto(configure: Callable[..., None], bucket: str) -> None:
    configure(MAX_RESPONSE_MB="0.01")

    result = run(seed=1, output_type="auto")

    assert result["images"][0]["bucket"] == bucket


# --- aliases, embedded parameters, one folder per job, S3 setup errors ------------------------


def test_aliases_come_back_as_canonical_names() -> None:
    result = run(seed=2, scheduler="euler_a", output_format="jpg")

    assert result["metadata"]["scheduler"] == "Euler a"
    assert result["metadata"]["output_format"] == "jpeg"
    image = open_image(base64.b64decode(result["images"][0]["image"]))
    assert (image.format, image.size) == ("JPEG", (64, 64))
    assert "Sampler: Euler a," in user_comment(image)


def test_parameters_leave_out_an_empty_negative_prompt() -> None:
    """As A1111 writes them: no "Negative prompt:" line at all when there is none."""
    result = run(seed=77, scheduler="Euler a")

    parameters = decode_png(result["images"][0]["image"]).text["parameters"]
    assert parameters == (
        "a fox\n"
        f"Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 77, Size: 64x64, Model: {result['metadata']['model']}, "
        "RNG: CPU"
    )


def test_a_job_without_an_id_uploads_into_one_folder(s3_server: S3Server, bucket: str) -> None:
    result = asyncio.run(
        handler.handler({"input": {"prompt": "a fox", **FAST, "seed": 5, "num_images": 3, "output_type": "s3"}})
    )

    keys = [item["key"] for item in result["images"]]
    folders = {key.rsplit("/", 1)[0] for key in keys}
    assert len(folders) == 1, keys
    [folder] = folders
    assert folder.startswith("test/job-")
    assert [key.rsplit("/", 1)[1] for key in keys] == ["0-5.png", "1-6.png", "2-7.png"]
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=folder + "/")
    assert sorted(item["Key"] for item in listed["Contents"]) == keys


@pytest.mark.parametrize(
    ("variables", "names"),
    [
        pytest.param(
            {"BUCKET_REGION": "us east 1"}, ["'renders'", "AWS S3", "InvalidRegionError", "us east 1"], id="region"
        ),
        pytest.param(
            {"BUCKET_ENDPOINT_URL": "http://my minio:9000"},
            ["'renders'", "at http://my minio:9000", "Invalid endpoint"],
            id="endpoint",
        ),
    ],
)
def test_bad_s3_setup_is_a_storage_error_naming_the_endpoint(variables: dict[str, str], names: list[str]) -> None:
    from src.errors import StorageError
    from src.settings import load_settings
    from src.storage import S3Storage

    settings = load_settings(
        {"BUCKET_NAME": "renders", "BUCKET_ACCESS_KEY_ID": ACCESS_KEY, "BUCKET_SECRET_ACCESS_KEY": SECRET, **variables}
    )
    with pytest.raises(StorageError) as caught:
        S3Storage(settings)
    message = str(caught.value)
    assert message.startswith("cannot set up the S3 client for bucket ")
    for name in names:
        assert name in message
    assert SECRET not in message
    assert ACCESS_KEY not in message


def test_bad_s3_setup_stops_startup_with_a_message(
    configure: Callable[..., None], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["handler.py"])
    configure(
        BUCKET_NAME="renders",
        BUCKET_REGION="us east 1",
        BUCKET_SECRET_ACCESS_KEY=SECRET,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
    )

    with caplog.at_level(logging.ERROR, logger="handler"):
        status = handler.main()

    assert status == 1
    [record] = [record for record in caplog.records if record.name == "handler"]
    assert record.getMessage().startswith("startup failed: cannot set up the S3 client for bucket 'renders'")
    assert "us east 1" in record.getMessage()
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("endpoint", "region"),
    [
        ("https://s3.eu-west-1.amazonaws.com", "eu-west-1"),
        ("https://renders.s3.eu-central-1.amazonaws.com", "eu-central-1"),
        ("https://s3.us-west-004.backblazeb2.com", "us-west-004"),
        ("https://nyc3.digitaloceanspaces.com", "nyc3"),
        ("https://s3.amazonaws.com", "us-east-1"),
        ("http://127.0.0.1:9000", "us-east-1"),
        # No region in these hosts: the label after s3 is the provider's domain, or AWS's dual-stack label.
        ("https://s3.wasabisys.com", "us-east-1"),
        ("https://s3.us-east-2.wasabisys.com", "us-east-2"),
        ("https://s3.filebase.com", "us-east-1"),
        ("https://s3.dualstack.eu-west-1.amazonaws.com", "eu-west-1"),
    ],
)
def test_the_region_is_read_from_the_endpoint_as_runpods_uploader_reads_it(endpoint: str, region: str) -> None:
    settings = load_settings({"BUCKET_NAME": "renders", "BUCKET_ENDPOINT_URL": endpoint})

    assert settings.bucket_region_name == region
    assert load_settings({**settings_env(endpoint), "BUCKET_REGION": "ap-south-1"}).bucket_region_name == "ap-south-1"


def settings_env(endpoint: str) -> dict[str, str]:
    return {
        "BUCKET_NAME": "renders",
        "BUCKET_ENDPOINT_URL": endpoint,
        "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
    }


def test_an_endpoint_naming_the_bucket_in_its_host_stores_keys_where_they_belong() -> None:
    # As RunPod's docs write an endpoint: the bucket in the host. With the bucket also in the path, every object
    # would land under a folder named after the bucket.
    storage = S3Storage(load_settings(settings_env("https://renders.s3.eu-west-1.amazonaws.com")))
    plain = S3Storage(load_settings(settings_env("https://s3.eu-west-1.amazonaws.com")))

    assert storage.endpoint == plain.endpoint == "https://s3.eu-west-1.amazonaws.com"
    request = storage._client.generate_presigned_url("get_object", Params={"Bucket": "renders", "Key": "a/0-1.png"})
    assert request.startswith("https://s3.eu-west-1.amazonaws.com/renders/a/0-1.png?")
    assert "eu-west-1" in request


@pytest.mark.parametrize("prefix", ["/out/", "my renders/", "renders", "a//b/"])
def test_a_bucket_prefix_that_would_make_unreadable_keys_stops_startup(prefix: str) -> None:
    with pytest.raises(SettingsError, match=r"BUCKET_PREFIX="):
        load_settings({**settings_env("http://127.0.0.1:9000"), "BUCKET_PREFIX": prefix})
    assert load_settings({**settings_env("http://127.0.0.1:9000"), "BUCKET_PREFIX": "renders/2026/"})


def test_bucket_variables_without_a_name_are_warned_of_at_startup() -> None:
    endpoint = "https://s3.eu-west-1.amazonaws.com"
    warned = load_settings(
        {"BUCKET_ENDPOINT_URL": endpoint, "BUCKET_ACCESS_KEY_ID": "k", "BUCKET_SECRET_ACCESS_KEY": "s"}
    )

    assert warned.bucket_without_a_name == (
        "BUCKET_ENDPOINT_URL and BUCKET_ACCESS_KEY_ID set but BUCKET_NAME is not: no image is uploaded, "
        "all come back inline"
    )
    assert load_settings(settings_env("https://s3.eu-west-1.amazonaws.com")).bucket_without_a_name is None
