"""The web UI at ``/ui`` of the server: a gradio chat with the served model.

Multi-turn chat with streamed answers; media of every modality, each with its weight slider (the files
ride on the latest question and are mixed into the one injected feature); a 3-D preview of point clouds;
the official demo's cache and sampling controls and defaults. Uploads are decoded under the server's
limits by the same code as the API's media. Mounted on the API's app, never behind a public share link;
with an API key, the key is the UI's password (any user name).
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from PIL import Image, ImageDraw

from imagebind_llm.apps.unclip import image_embedding
from imagebind_llm.engine import BlendOptions, EngineStopped, QueueFullError, Request
from imagebind_llm.llm.generate import SamplingOptions
from imagebind_llm.preprocess.points import parse_points, sniff_point_format
from imagebind_llm.serve.media import check_size
from imagebind_llm.serve.protocol import APIError, MediaPart
from imagebind_llm.serve.service import Service

try:
    import gradio as gr
except ImportError as e:
    raise ImportError("the web UI needs gradio: pip install 'imagebind-llm[ui]' (or serve with --no-ui)") from e

Message = dict[str, Any]
POINT_FILES = [".npy", ".ply", ".pt"]
_WIDGETS: dict[str, Callable[..., Any]] = {  # modality -> its input widget (files reach the handler as paths)
    "image": partial(gr.Image, type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"]),
    "video": partial(gr.Video, label="Video", sources=["upload"]),
    "audio": partial(gr.Audio, type="filepath", label="Audio", sources=["upload"]),
    "point": partial(gr.File, label="Point cloud (.npy, .ply, .pt)", file_types=POINT_FILES),
    "depth": partial(gr.File, label="Depth map (metric depth: 16-bit PNG in mm, or .npy)", file_types=[".png", ".npy"]),
    "thermal": partial(gr.Image, type="filepath", image_mode=None, label="Thermal image", sources=["upload"]),
    "text": partial(gr.Textbox, label="Text (a modality of its own, not the question)", lines=2),
}


def mount_ui(app: FastAPI, service: Service) -> FastAPI:
    """Mount the UI of ``service`` on ``app`` at ``/ui`` (password: the API key, when the server has one)."""
    key = service.config.api_key
    auth = (lambda user, password: hmac.compare_digest(password.encode(), key.encode())) if key else None
    return gr.mount_gradio_app(app, build_ui(service), path="/ui", auth=auth, ssr_mode=False, mcp_server=False,
                               max_file_size=service.config.media.max_bytes, footer_links=[])


def build_ui(service: Service) -> gr.Blocks:
    """The page: media and their weights on the left, the chat and the options on the right."""
    names = list(_WIDGETS)
    with gr.Blocks(title="ImageBind-LLM", analytics_enabled=False) as blocks:
        gr.Markdown(f"## ImageBind-LLM — `{service.config.model_id}`")
        with gr.Row():
            with gr.Column(scale=2):
                media, weights = [], []
                with gr.Tabs():
                    for name in names:
                        with gr.Tab(name.capitalize()):
                            media.append(_WIDGETS[name](elem_id=f"{name}-input"))
                            weights.append(gr.Slider(0, 1, value=1, step=0.05, label=f"{name.capitalize()} weight",
                                                     elem_id=f"{name}-weight"))
                            if name == "point":
                                preview = gr.Image(label="3D preview", interactive=False, type="pil")
            with gr.Column(scale=3):
                output = gr.Dropdown(["Text", "Image"], value="Text", label="Output type", elem_id="output-type",
                                     info="Image: draw the mix of the media with Stable unCLIP (serve --unclip)")
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=440)
                picture = gr.Image(label="Generated image", interactive=False, type="pil", visible=False)
                question = gr.Textbox(label="Question", placeholder="Ask about the media…", elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Options", open=True):
                    options = [
                        gr.Slider(1, 100, value=10, step=1, label="Cache size", elem_id="cache-size"),
                        gr.Slider(0, 100, value=20, label="Cache temperature", elem_id="cache-temperature"),
                        gr.Slider(0, 1, value=0.5, label="Cache weight", elem_id="cache-weight",
                                  info="the cache options apply when the server has a retrieval cache"),
                        gr.Slider(1, 512, value=128, step=1, label="Max length", elem_id="max-length"),
                        gr.Slider(0, 1, value=0.1, label="Temperature", elem_id="temperature"),
                        gr.Slider(0, 1, value=0.75, label="Top p", elem_id="top-p"),
                    ]

        def respond(kind: str, history: list[Message], text: str, *values: Any) -> Iterator[tuple[Any, ...]]:
            if kind == "Image":
                yield history, text, imagine(service, names, text, values)
            else:
                yield from ((*step, None) for step in chat(service, names, history, text, values))

        event = dict(fn=respond, inputs=[output, chatbot, question, *media, *weights, *options],
                     outputs=[chatbot, question, picture],
                     concurrency_limit=None)  # the engine batches the answers and bounds its own queue
        send.click(**event)
        question.submit(**event)
        clear.click(lambda: ([], "", None), outputs=[chatbot, question, picture])
        output.change(lambda kind: (gr.update(visible=kind == "Text"), gr.update(visible=kind == "Image")), output,
                      [chatbot, picture])
        media[names.index("point")].change(lambda path: point_preview(service, path), media[names.index("point")],
                                           preview)
    return blocks


def chat(service: Service, names: list[str], history: list[Message], question: str,
         values: tuple[Any, ...]) -> Iterator[tuple[list[Message], str]]:
    """Answer ``question`` after ``history`` with the current media: yields the growing chat (and an empty box)."""
    question = (question or "").strip()
    if not question:
        raise gr.Error("Type a question first.")
    given, options = _split(names, values)
    if given and not any(weight for _, _, weight in given):
        raise gr.Error("Every given medium has weight 0: raise at least one weight slider.")
    parts = [decode(service, name, source, weight) for name, source, weight in given]
    cache_size, cache_temperature, cache_weight, max_length, temperature, top_p = options
    history = [{"role": m["role"], "content": _text(m["content"])} for m in history]
    request = Request(messages=[*history, {"role": "user", "content": [*parts, {"type": "text", "text": question}]}],
                      sampling=SamplingOptions(max_new_tokens=int(max_length),  # top p 0 keeps the likeliest token
                                               temperature=float(temperature) if top_p > 0 else 0.0,
                                               top_p=float(top_p) if top_p > 0 else None),
                      blend=BlendOptions(int(cache_size), float(cache_temperature), float(cache_weight)))
    try:
        engine = service.engine
        request.prompt_ids = engine.prompt_ids(request)
        handle = engine.submit(request)
    except (APIError, ValueError, QueueFullError, EngineStopped) as e:
        raise gr.Error(getattr(e, "message", str(e))) from None
    history += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    answer = ""
    try:
        for piece in handle.stream():
            answer += piece
            history[-1]["content"] = answer.lstrip()
            yield history, ""
    except Exception as e:
        raise gr.Error(f"Generation failed: {e}") from None
    finally:
        if not handle.done:
            handle.cancel()  # the page went away: free the row
    history[-1]["content"] = answer.strip() or "(empty answer)"
    yield history, ""


def imagine(service: Service, names: list[str], prompt: str, values: tuple[Any, ...]) -> Image.Image:
    """The official demo's image output: the media's pre-normalisation mix (the cache blend included) drawn by
    Stable unCLIP with ``prompt``."""
    if service.unclip is None:
        raise gr.Error("This server does not make images: start it with --unclip (and the images extra).")
    given, options = _split(names, values)
    if not any(weight for _, _, weight in given):
        raise gr.Error("Give at least one medium with a weight above 0 to draw.")
    cache_size, cache_temperature, cache_weight = options[:3]
    request = Request(messages=[{"role": "user", "content": [decode(service, *g) for g in given]}],
                      blend=BlendOptions(int(cache_size), float(cache_temperature), float(cache_weight)))
    try:
        embeds = image_embedding(service.engine, request)
        return service.unclip.generate(embeds, (prompt or "").strip(), seed=0)[0]
    except (APIError, OSError, ValueError) as e:
        raise gr.Error(getattr(e, "message", str(e))) from None


def _split(names: list[str], values: tuple[Any, ...]) -> tuple[list[tuple[str, str, float]], tuple[Any, ...]]:
    """The page's inputs (media widgets, their weights, the options) -> ((name, source, weight) of each given
    medium, the options)."""
    sources, weights, options = values[:len(names)], values[len(names):2 * len(names)], values[2 * len(names):]
    return [(n, src, float(w)) for n, src, w in zip(names, sources, weights) if src], options


def decode(service: Service, name: str, source: str, weight: float) -> Message:
    """One uploaded file (or the text) -> its request part, decoded under the server's media limits."""
    if name == "text":
        part = MediaPart(name, "the text", data=source)
    else:
        path = Path(source)
        part = MediaPart(name, path.name, data=base64.b64encode(path.read_bytes()).decode(), format=path.suffix[1:])
    try:
        (tensor,) = service.decode_sync([part])
    except APIError as e:
        raise gr.Error(e.message) from None
    return {"type": name, name: tensor, "weight": weight}


def point_preview(service: Service, path: str | None) -> Image.Image | None:
    """The 3-D preview of an uploaded point cloud (None when the file is removed)."""
    if not path:
        return None
    file = Path(path)
    data = file.read_bytes()
    try:
        check_size(MediaPart("point", file.name), data, file.suffix[1:].lower(), service.config.media)
        points = parse_points(data, file.suffix.lower() or sniff_point_format(data))
    except APIError as e:
        raise gr.Error(e.message) from None
    except Exception as e:  # parsers raise many kinds; .pt files are read with weights_only=True
        raise gr.Error(f"{file.name}: cannot read the point cloud ({type(e).__name__}: {e})") from None
    if points.ndim != 2 or points.shape[1] < 3 or not np.issubdtype(points.dtype, np.number):
        raise gr.Error(f"{file.name}: expected points of shape [N, 3], got {list(points.shape)} {points.dtype}")
    return render_points(points[:, :3])


def render_points(points: np.ndarray, size: int = 360, max_points: int = 4000) -> Image.Image:
    """An orthographic three-quarter view of ``points [N, 3]``, near points drawn last and warmer."""
    xyz = np.asarray(points, dtype=np.float64)
    xyz = xyz[np.isfinite(xyz).all(axis=1)][::max(1, len(xyz) // max_points)]
    image = Image.new("RGB", (size, size), "white")
    if not len(xyz):
        return image
    a, b = np.radians(35), np.radians(25)  # turned about the vertical axis, then tilted towards the viewer
    turn = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    view = (xyz - xyz.mean(axis=0)) @ (tilt @ turn).T
    scale = np.abs(view[:, :2]).max() or 1.0
    x, y = (0.5 + 0.45 * view[:, 0] / scale) * size, (0.5 - 0.45 * view[:, 1] / scale) * size
    near = (view[:, 2] - view[:, 2].min()) / (np.ptp(view[:, 2]) or 1.0)
    draw = ImageDraw.Draw(image)
    for i in np.argsort(view[:, 2]):
        t = near[i]
        draw.ellipse((x[i] - 1.6, y[i] - 1.6, x[i] + 1.6, y[i] + 1.6),
                     fill=(int(40 + 210 * t), int(90 + 60 * (1 - t)), int(220 - 180 * t)))
    return image


def _text(content: Any) -> str:
    """A chat message's text (gradio hands messages back as lists of parts)."""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
