"""The frozen open_clip text tower and the CoOp-style prompt learner of the LV-Adapter.

``ClipTextEncoder`` keeps only the text parts of an open_clip CLIP model (token and
positional embeddings, transformer, final LayerNorm, projection, causal mask); it is
frozen and always in eval mode. ``PromptLearner`` holds the learnable context vectors
and turns them, placed before each class name, into one text embedding per class.
docs/checkpoints.md ("open_clip facts") lists the open_clip facts used here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from paf_ray.models.zoo import is_torchscript
from paf_ray.runtime import storage

# A CLIP small enough for CPU tests and demos (same tokenizer and vocabulary as RN50).
# `clip_model: paf-tiny-clip` works in every process that imports paf_ray, unlike a
# config registered with open_clip.add_model_config in one process only.
TINY_CLIP = "paf-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

PLACEHOLDER = "X"  # stands in for each context vector while tokenizing "X X X X <class>."


# Entries of OpenAI's TorchScript archives (RN50.pt ...) that no open_clip model has: OpenAI's
# `build_model` and open_clip's `build_model_from_openai_state_dict` delete exactly these before
# loading. They are the signal that a state dict was taken from OpenAI's archive.
OPENAI_ARCHIVE_ENTRIES = ("input_resolution", "context_length", "vocab_size")
ACTIVATIONS = ("quick_gelu", "gelu")


def read_clip_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """A CLIP weights file -> (float32 state dict in open_clip's names, layout "openai" | "open_clip").

    OpenAI layout: a TorchScript archive (only OpenAI publishes CLIP that way), or a state dict
    taken from one (it still holds ``OPENAI_ARCHIVE_ENTRIES``). Everything else - open_clip's
    .safetensors, ``torch.save(model.state_dict())``, its training checkpoints
    ``{"state_dict": {"module.…"}}`` - is open_clip's layout. The key names are the same in both.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"model.lv_adapter.clip_weights: {path!r} is not a file "
            "(OpenAI's TorchScript RN50.pt, a state dict or open_clip's .safetensors)"
        )
    if is_torchscript(path):
        # TorchScript, not pickle: torch.load(weights_only=True) refuses it, torch.jit.load reads it.
        sd, layout = dict(torch.jit.load(path, map_location="cpu").state_dict()), "openai"
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd, layout = load_file(path, device="cpu"), None
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd, layout = (obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj), None
        if not isinstance(sd, dict):
            raise ValueError(f"model.lv_adapter.clip_weights: {path}: expected a state dict, got {type(sd).__name__}")
        if sd and all(k.startswith("module.") for k in sd):  # saved from DDP (open_clip's training)
            sd = {k[len("module."):]: v for k, v in sd.items()}
    if layout is None:
        layout = "openai" if any(k in sd for k in OPENAI_ARCHIVE_ENTRIES) else "open_clip"
    # OpenAI's files are partly float16; attn_mask is derived (a scripted open_clip model saves it).
    skip = set(OPENAI_ARCHIVE_ENTRIES) | {"attn_mask"}
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in skip}
    return sd, layout


def clip_embed_dim(clip_model: str) -> int | None:
    """The text embedding size of an open_clip model name, from its config (None: no such model)."""
    if clip_model == TINY_CLIP:
        return TINY_CLIP_CONFIG["embed_dim"]
    from open_clip import get_model_config

    cfg = get_model_config(clip_model.removesuffix("-quickgelu"))
    return int(cfg["embed_dim"]) if cfg else None


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether an open_clip model's text MLPs use QuickGELU (the only parameterless part that differs)."""
    from open_clip.transformer import QuickGELU

    tower = getattr(model, "text", model)
    return any(isinstance(block.mlp.gelu, QuickGELU) for block in tower.transformer.resblocks)


def set_text_activation(model: nn.Module, activation: str) -> None:
    """Swap the text tower's MLP activation: same parameters, so weights and state dicts are untouched."""
    from open_clip.transformer import QuickGELU

    if activation not in ACTIVATIONS:
        raise ValueError(f"model.lv_adapter.activation: expected one of {ACTIVATIONS}, got {activation!r}")
    tower = getattr(model, "text", model)
    for block in tower.transformer.resblocks:
        block.mlp.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()


def resolve_activation(setting: str, named_quick_gelu: bool, layout: Optional[str], path: str = "") -> str:
    """The text tower's activation from the config and, when weights are read, their layout.

    OpenAI trained CLIP with QuickGELU, so OpenAI's layout decides (whatever the model name
    says) and an explicit `gelu` is an error. open_clip's layout is what open_clip trains (GELU), but it is
    also how OpenAI's weights are republished (e.g. timm/resnet50_clip.openai): the tensors cannot
    tell, so there an explicit `quick_gelu` (or a `-quickgelu` model name) is honoured.
    """
    if setting == "gelu" and named_quick_gelu:
        raise ValueError("model.lv_adapter.activation: gelu contradicts model.lv_adapter.clip_model (a QuickGELU model)")
    explicit = setting if setting != "auto" else ("quick_gelu" if named_quick_gelu else None)
    if layout == "openai":
        if explicit == "gelu":
            raise ValueError(
                f"model.lv_adapter.activation: gelu, but {path} holds OpenAI's CLIP weights (TorchScript archive "
                "or its state dict), which were trained with QuickGELU: set it to auto or quick_gelu"
            )
        return "quick_gelu"
    return explicit or "gelu"


def load_clip(
    clip_model: str, clip_weights: Optional[str] = None, load_weights: bool = True, activation: str = "auto"
) -> nn.Module:
    """An open_clip CLIP model: random init, or weights from a file (a local path, or a URI read
    through this node's cache; never a model hub).

    The architecture comes from `clip_model` (a name the config's rules accepted); the text tower's
    activation from `activation` and the
    weights (``resolve_activation``). `load_weights=False` builds the architecture only (inspect, or
    before a paf_ray checkpoint's state dict, which holds the text tower, is loaded over the model).
    """
    import open_clip

    weights = clip_weights if load_weights else None
    if weights:
        try:
            weights = storage.local_file(weights)  # a URI is read through this node's cache
        except (FileNotFoundError, IsADirectoryError):
            pass  # read_clip_weights names the key
    sd, layout = read_clip_weights(weights) if weights else (None, None)
    if clip_model == TINY_CLIP:
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    else:
        model = open_clip.create_model(clip_model, pretrained=None)
    set_text_activation(model, resolve_activation(activation, uses_quick_gelu(model), layout, weights or ""))
    if sd is not None:
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"model.lv_adapter.clip_weights: {weights} does not fit model.lv_adapter.clip_model {clip_model!r} "
                f"({layout} layout): missing {missing[:8]}, unexpected {unexpected[:8]}, shapes {mismatched[:8]}"
            )
        model.load_state_dict(sd)
    return model


def get_tokenizer(clip_model: str):
    import open_clip

    if clip_model == TINY_CLIP:
        return open_clip.SimpleTokenizer()
    return open_clip.get_tokenizer(clip_model)


class ClipTextEncoder(nn.Module):
    """The text tower of an open_clip CLIP model, frozen, encoding token *embeddings*.

    Feeding embeddings instead of token ids is what lets learned context vectors replace
    placeholder tokens. Sequences may be shorter than the tower's 77 positions: with the
    causal mask the output at the end-of-text token does not depend on later positions.
    """

    def __init__(self, clip_model: str = "RN50", clip_weights: Optional[str] = None, load_weights: bool = True,
                 activation: str = "auto"):
        super().__init__()
        model = load_clip(clip_model, clip_weights, load_weights, activation)
        # CustomTextCLIP keeps its text tower under `.text`; CLIP puts the parts on itself.
        tower = getattr(model, "text", model)
        if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
            raise ValueError(
                f"model.lv_adapter.clip_model: {clip_model!r} has no open_clip TextTransformer text tower "
                "(Hugging Face text towers are not supported)"
            )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ValueError(f"model.lv_adapter.clip_model: {clip_model!r}: text towers with a CLS token are not supported")
        self.clip_model = clip_model
        self.activation = "quick_gelu" if uses_quick_gelu(model) else "gelu"
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        if self.pool_type not in ("argmax", "eos"):
            raise ValueError(
                f"model.lv_adapter.clip_model: {clip_model!r}: text pool type {self.pool_type!r} is not supported "
                "(argmax or eos)"
            )
        self.width = self.token_embedding.embedding_dim
        if self.text_projection is None:
            self.embed_dim = self.width
        elif isinstance(self.text_projection, nn.Linear):
            self.embed_dim = self.text_projection.out_features
        else:
            self.embed_dim = self.text_projection.shape[1]
        self.context_length = self.positional_embedding.shape[0]
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval, whatever the parent does

    def set_activation(self, activation: str) -> None:
        """Used when a paf_ray checkpoint says which activation its text tower was trained with."""
        set_text_activation(self, activation)
        self.activation = activation

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return get_tokenizer(self.clip_model)(list(texts))

    def end_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the token whose output is the sentence embedding (EOT)."""
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """embeddings [N, L, width] (token embeddings, possibly with learned slots), tokens [N, L] -> [N, embed_dim]."""
        length = embeddings.shape[1]
        if length > self.context_length:
            raise ValueError(f"prompt of {length} tokens is longer than the text tower's {self.context_length}")
        x = embeddings + self.positional_embedding[:length].to(embeddings.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.end_positions(tokens)]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


class PromptLearner(nn.Module):
    """Learnable context vectors before each class name, one set per task (or one shared).

    Each class is tokenized as "X X ... X <name>." with ``n_ctx`` placeholders; at run time
    the placeholders' embeddings are replaced by the context vectors. The token ids stay
    buffers (rebuilt from the tokenizer), the start/name/end embeddings are looked up from
    the frozen token embedding on every call, so loading a state dict never leaves them stale.
    """

    def __init__(
        self,
        text_encoder: ClipTextEncoder,
        class_names: dict[str, tuple[str, ...]],
        n_ctx: int = 8,
        ctx_init: str = "a photo of a",
        task_specific: bool = True,
    ):
        super().__init__()
        self.n_ctx = n_ctx
        self.tasks = list(class_names)
        self.task_specific = task_specific
        tokenizer = get_tokenizer(text_encoder.clip_model)
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        placeholder_id = int(tokenizer([PLACEHOLDER])[0, 1])
        tokens = {}
        for task, names in class_names.items():
            tok = tokenizer([f"{prefix} {name}." for name in names])
            if not bool((tok[:, 1 : 1 + n_ctx] == placeholder_id).all()):
                raise ValueError(f"model.lv_adapter.n_ctx: {n_ctx} context slots do not fit the text tower's context length")
            tokens[task] = tok
        # Cut every prompt after the longest end-of-text position (not 77): same result, less work.
        length = int(max(int(text_encoder.end_positions(t).max()) for t in tokens.values())) + 1
        for task, tok in tokens.items():
            self.register_buffer(f"tokens_{task}", tok[:, :length].contiguous(), persistent=False)

        init = self._initial_context(text_encoder, tokenizer, ctx_init)
        keys = self.tasks if task_specific else ["shared"]
        self.ctx = nn.ParameterDict({k: nn.Parameter(init.clone()) for k in keys})

    def _initial_context(self, text_encoder: ClipTextEncoder, tokenizer, ctx_init: str) -> torch.Tensor:
        width = text_encoder.width
        ctx = torch.empty(self.n_ctx, width)
        nn.init.normal_(ctx, std=0.02)
        phrase = ctx_init.strip()
        if phrase:
            tok = tokenizer([phrase])[0]
            end = int(text_encoder.end_positions(tok[None])[0])
            ids = tok[1:end]
            with torch.no_grad():
                words = text_encoder.token_embedding(ids).float()
            # Keep the phrase's last tokens, right before the class name; random slots in front.
            words = words[-self.n_ctx :]
            ctx[self.n_ctx - len(words) :] = words
        return ctx

    def tokens(self, task: str) -> torch.Tensor:
        return getattr(self, f"tokens_{task}")

    def context(self, task: str) -> nn.Parameter:
        return self.ctx[task if self.task_specific else "shared"]

    def forward(self, text_encoder: ClipTextEncoder) -> dict[str, torch.Tensor]:
        """-> {task: [K_task, embed_dim]} class embeddings (not normalised)."""
        prompts, all_tokens = [], []
        for task in self.tasks:
            tok = self.tokens(task)
            with torch.no_grad():
                words = text_encoder.token_embedding(tok)
            ctx = self.context(task).to(words.dtype)
            k = tok.shape[0]
            prompts.append(torch.cat([words[:, :1], ctx.unsqueeze(0).expand(k, -1, -1), words[:, 1 + self.n_ctx :]], 1))
            all_tokens.append(tok)
        out = text_encoder(torch.cat(prompts), torch.cat(all_tokens))
        return dict(zip(self.tasks, out.split([t.shape[0] for t in all_tokens])))

