"""A synthetic multimodal world, deterministic from a seed: scenes, captions, questions, speech, point clouds.

It trains a tiny ImageBind (vision + text CLIP-style, audio and point towers bound to the frozen vision tower)
and a tiny ImageBind-LLM, and evaluates them MME-style on colour-shape pairs training never shows.

- Scenes (224 x 224): 1-3 shapes (7 shapes x 8 colours x 2 sizes) on a 3 x 3 grid; some scenes add a sign with
  a word (139 words, DejaVu fonts) or a card with a real handwritten digit (scikit-learn's UCI digits).
- Language from the scene graph: a caption, a detailed description, short-answer questions (count, position,
  colour, sign word, digit) and MME yes/no pairs (existence, count, position, color, OCR).
- Audio: the caption spoken by espeak-ng (8 voices, 4 speeds), 16 kHz mono WAV, paired with its scene.
- Points: 8192-point noisy surface clouds of 6 primitives (sphere, cube, cylinder, cone, torus, pyramid),
  rotated and scaled, each paired with a shaded 224 x 224 render of the same posed solid.
- Held out: one shape per colour (8 colour-shape pairs, drawn from the seed) never occurs in training; each
  held-out scene holds one of them. Held-out digits are handwriting scans training never uses.
- Hard negatives (``variants=N``): training scenes come in families of N, a scene and its counterfactuals (one
  shape's kind, the sign's word or the digit changed), consecutive in every file; ``train bind`` keeps each
  family in one batch with ``data.group_size=N``, so the contrastive loss needs shapes and reading.

Folder layout written by `generate` (``imagebind-llm world generate``); paths inside files are relative to the
file's own split folder (use it as ``data.image_root`` for training)::

    world.json                    seed, counts, vocabularies, held-out pairs, digit split, voices
    train/ and heldout/, each:
      scenes/NNNNNN.png           the scene images
      scenes.jsonl                scene graphs: shapes (shape, colour, size, cell, position), sign, digit,
                                  caption, voice, speed
      captions.tsv                stage 1: columns image, caption (`imagebind_llm.train.data` format)
      instructions.json           stage 2: LLaVA conversations, every question of a scene with its answer
      pairs_vision_text.jsonl     {"vision": "scenes/x.png", "text": caption}
      audio/NNNNNN.wav            spoken captions (unless --no-audio)
      pairs_vision_audio.jsonl    {"vision": "scenes/x.png", "audio": "audio/x.wav"}
      points/NNNNNN.npy           clouds [8192, 3] float32, centred, largest radius 1 (with --points)
      renders/NNNNNN.png          the shaded render of each cloud's solid
      pairs_vision_point.jsonl    {"vision": "renders/x.png", "point": "points/x.npy"}
      pairs_render_text.jsonl     {"vision": "renders/x.png", "text": "a 3D torus"} (the towers learn the primitives)
      render_captions.tsv         stage 1 on the renders: columns image, caption ("a 3D torus")
      render_instructions.json    stage 2 on the renders: "What object is this?" -> "A torus."
    heldout/ also:
      mme/<subtask>/images/NNNNNN.png, mme/<subtask>/questions_answers_YN/NNNNNN.txt
                                  MME layout for `imagebind-llm eval mme --data heldout/mme`: existence, count,
                                  position, color, OCR; two lines ``question<TAB>Yes|No`` per image
      zeroshot_image.jsonl        {"image": ..., "label": "red star"} for the one-shape scenes
      zeroshot_audio.jsonl        {"audio": ..., "label": "red star"} for the one-shape scenes
      zeroshot_point.jsonl        {"point": ..., "label": "torus"}
    (zero-shot manifests are `imagebind_llm.eval.zero_shot` manifests with a ``label`` column)

Python API::

    from imagebind_llm.world import (caption, generate, point_cloud, questions, render_scene, sample_scene,
                                     sample_solid, speak)
    generate("world/", seed=0, train=20000, heldout=1000, points=5000)
    rng = np.random.default_rng(0)
    scene = sample_scene(rng)
    render_scene(scene).save("x.png"); caption(scene); questions(scene, rng)
    cloud = point_cloud(sample_solid(rng, "torus"), rng)        # [8192, 3] float32
    samples = speak("a red star", "en-gb", 150)                 # [n] float32 at 16 kHz
"""

from .audio import SAMPLE_RATE, SPEEDS, VOICES, espeak_missing, speak, write_wav
from .language import MME_SUBTASKS, QA, caption, description, mme_pair, open_questions, questions
from .points import POINTS_PER_CLOUD, PRIMITIVES, Solid, point_cloud, render_primitive, sample_solid, surface
from .scene import (COLOURS, POSITIONS, SHAPES, SIZES, WORDS, Digit, Scene, Shape, Sign, WorldError, all_pairs,
                    counterfactual, digit_scans, heldout_pairs, render_scene, sample_scene)
from .write import generate, make_scene

__all__ = [
    "COLOURS", "MME_SUBTASKS", "POINTS_PER_CLOUD", "POSITIONS", "PRIMITIVES", "QA", "SAMPLE_RATE", "SHAPES", "SIZES",
    "SPEEDS", "VOICES", "WORDS", "Digit", "Scene", "Shape", "Sign", "Solid", "WorldError", "all_pairs", "caption",
    "counterfactual", "description", "digit_scans", "espeak_missing", "generate", "heldout_pairs", "make_scene", "mme_pair",
    "open_questions", "point_cloud", "questions", "render_primitive", "render_scene", "sample_scene",
    "sample_solid", "speak", "surface", "write_wav",
]
