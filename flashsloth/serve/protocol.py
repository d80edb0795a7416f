"""
The OpenAI chat-completions request format, checked: every request becomes FlashSloth messages, decoded images and
generation settings, or an `ApiError` that says what was wrong (the server answers it as a 4xx OpenAI error JSON).
"""

import base64
import binascii
import io
import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError


ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for; the defaults are `flashsloth serve`'s."""

    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 8 * 2**20
    max_tokens_cap: int = 512
    allow_remote_images: bool = False
    remote_image_timeout: float = 10.0


@dataclass(frozen=True)
class GenerationSettings:
    """The sampling settings of one request; `temperature == 0` is greedy decoding."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share one `generate` call; `None`: this request runs alone (seeded sampling,
        whose answer depends on the random stream of its own call)."""
        if self.greedy:
            return ("greedy", self.logit_bias)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.logit_bias)

    def generate_kwargs(self) -> dict:
        """The `generate` arguments of these settings (the same for a request alone and for a batch)."""
        bias = {"sequence_bias": {(token,): bias for token, bias in self.logit_bias}} if self.logit_bias else {}
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, **bias}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0, **bias}


@dataclass
class ChatRequest:
    messages: list[dict]
    images: list = field(default_factory=list)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be {kind}, got {value!r}.", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}.", param=name)
    return value


def parse_logit_bias(value, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: `{"token id": bias}` with biases from -100 (ban) to 100, added to the logits."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to biases.", param="logit_bias")
    pairs = []
    for token, bias in value.items():
        if not str(token).isdigit() or not int(token) < vocab_size:
            raise ApiError(
                400,
                f"'logit_bias': {token!r} is not a token id of this model (0 to {vocab_size - 1}).",
                param="logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, f"'logit_bias' values go from -100 to 100, got {bias!r}.", param="logit_bias")
        pairs.append((int(token), float(bias)))
    return tuple(sorted(pairs))


def parse_settings(body: dict, limits: Limits, vocab_size: int) -> GenerationSettings:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ApiError(400, f"'{param}' must be a positive integer, got {max_tokens!r}.", param=param)
        if max_tokens > limits.max_tokens_cap:
            raise ApiError(
                400,
                f"'{param}' is {max_tokens}, more than this server's cap of {limits.max_tokens_cap} tokens per answer "
                "(flashsloth serve --max-tokens-cap). Ask for fewer tokens.",
                param=param,
                code="max_tokens_over_cap",
            )
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        stop = tuple(stop)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of strings, got {stop!r}.", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES or any(not item for item in stop):
        raise ApiError(
            400, f"'stop' takes 1 to {MAX_STOP_SEQUENCES} non-empty strings, got {list(stop)!r}.", param="stop"
        )
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {body.get('n')!r}.", param="n")
    return GenerationSettings(
        logit_bias=parse_logit_bias(body.get("logit_bias"), vocab_size),
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        stop=stop,
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
    )


def check_image_size(image: Image.Image, limits: Limits, param: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(
            400, f"The image at {param} is empty ({width}x{height} pixels).", param=param, code="invalid_image"
        )
    if width * height > limits.max_image_pixels:
        raise ApiError(
            400,
            f"The image at {param} is {width}x{height} = {width * height} pixels, more than this server's limit of "
            f"{limits.max_image_pixels} (flashsloth serve --max-image-pixels). Downscale it before sending.",
            param=param,
            code="image_too_large",
        )


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Open image bytes as RGB; the size is read from the header before any pixel is decoded (decompression bombs)."""
    if len(data) > limits.max_image_bytes:
        raise ApiError(
            400,
            f"The image at {param} is {len(data)} bytes, more than this server's limit of {limits.max_image_bytes}.",
            param=param,
            code="image_too_large",
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_image_size(image, limits, param)
            image.load()
            return image.convert("RGB")
    except ApiError:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, raised when opening far larger images
        raise ApiError(
            400, f"The image at {param} is too large: {error}", param=param, code="image_too_large"
        ) from error
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise ApiError(
            400,
            f"Cannot decode the image at {param}: {error}. Send a PNG, JPEG, WebP or GIF file.",
            param=param,
            code="invalid_image",
        ) from error


def fetch_remote_image(url: str, limits: Limits, param: str) -> bytes:
    """Download an http(s) image (only with --allow-remote-images), reading at most the byte limit plus one."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "flashsloth-serve"})
        with urllib.request.urlopen(request, timeout=limits.remote_image_timeout) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiError(400, f"Cannot download the image at {param} ({url[:200]}): {error}.", param=param) from error
    return data


def load_image_url(url, limits: Limits, param: str) -> Image.Image:
    if not isinstance(url, str):
        raise ApiError(400, f"{param} must be a string URL, got {type(url).__name__}.", param=param)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(
                400,
                f"{param} must be a base64 data URL ('data:image/png;base64,...').",
                param=param,
                code="invalid_image",
            )
        if len(payload) > 4 * (limits.max_image_bytes // 3 + 1):
            decode_image(b"\0" * (limits.max_image_bytes + 1), limits, param)  # raises image_too_large
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ApiError(
                400, f"{param} holds invalid base64: {error}.", param=param, code="invalid_image"
            ) from error
        return decode_image(data, limits, param)
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise ApiError(
                400,
                f"{param} is an http(s) URL, and this server does not download images. Send the image inline as a "
                "data URL ('data:image/png;base64,...'), or start the server with --allow-remote-images.",
                param=param,
                code="remote_images_disabled",
            )
        return decode_image(fetch_remote_image(url, limits, param), limits, param)
    raise ApiError(400, f"{param}: unsupported URL {url[:40]!r}; send a data: URL.", param=param, code="invalid_image")


def parse_content(content, role: str, param: str, limits: Limits, images: list) -> list[dict]:
    """OpenAI content (a string or a list of parts) as FlashSloth items; images are decoded and appended to `images`."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None and role == "assistant":
        return [{"type": "text", "text": ""}]
    if not isinstance(content, list):
        raise ApiError(400, f"{param} must be a string or a list of content parts.", param=param)
    items = []
    for index, part in enumerate(content):
        part_param = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{part_param}.text must be a string.", param=f"{part_param}.text")
            items.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise ApiError(
                    400, f"{part_param}: images go in user messages, not in '{role}' ones.", param=part_param
                )
            if len(images) >= limits.max_images:
                raise ApiError(
                    400,
                    f"Too many images: this server takes at most {limits.max_images} per request "
                    "(flashsloth serve --max-images).",
                    param=part_param,
                    code="too_many_images",
                )
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append(load_image_url(url, limits, f"{part_param}.image_url"))
            items.append({"type": "image"})
        else:
            raise ApiError(
                400,
                f"{part_param}: unsupported content part type {kind!r}; FlashSloth reads 'text' and 'image_url' parts.",
                param=f"{part_param}.type",
            )
    # The chat template puts a user turn's images first: keep that order for the images list as well.
    return [item for item in items if item["type"] == "image"] + [item for item in items if item["type"] == "text"]


def parse_chat_request(body, limits: Limits, vocab_size: int) -> ChatRequest:
    """Check a decoded JSON body of `POST /v1/chat/completions` and turn it into a `ChatRequest`."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages.", param="messages")
    settings = parse_settings(body, limits, vocab_size)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
    converted, images = [], []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object with 'role' and 'content'.", param=param)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"{param}.role is {role!r}; FlashSloth chats take 'system' (or 'developer'), 'user' and 'assistant'.",
                param=f"{param}.role",
                code="unknown_role",
            )
        role = "system" if role == "developer" else role
        if role == "system" and index != 0:
            raise ApiError(400, f"{param}: a system message can only be the first message.", param=f"{param}.role")
        content = parse_content(message.get("content"), role, f"{param}.content", limits, images)
        converted.append({"role": role, "content": content})
    if converted[-1]["role"] != "user":
        raise ApiError(400, "The last message must be a user message: the answer follows it.", param="messages")
    return ChatRequest(converted, images, settings, stream, bool(stream_options.get("include_usage")))
