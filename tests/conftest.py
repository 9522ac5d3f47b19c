"""Shared fixtures: a tiny tokenizer and tiny random models that build offline in milliseconds.

The tokenizer is a byte-level BPE trained here on a few sentences, so it encodes any text (every
byte is in the vocabulary), with the special tokens of a ChatML chat model (like the built-in
SmolLM2): `<|im_end|>` is EOS, `<pad>` is the pad token, and no BOS is added to plain text.
Models are random, seeded, float32, in eval mode, with `vocab_size == len(tokenizer)`; while a test
uses one, torch runs on a single thread (faster for models this small, and immune to a busy CPU).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

TINY_VOCAB = 320  # 256 byte symbols + 4 special tokens + 60 merges
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "Human: How do I make a cup of tea? Assistant: Boil the water, then steep the tea for three minutes.",
    "A horseshoe is a U-shaped metal plate nailed to the hoof of a horse to protect it.",
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "I am sorry, but I cannot help with that. Is there anything else you would like to know?",
    "Python is a programming language; numbers such as 42 and 3.14 appear in code too.",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def make_tiny_tokenizer():
    """A fresh tokenizer (tests may change its settings freely)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models only lose time to thread hand-offs (10x on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer, one_thread):
    """(model, tokenizer): a 2-layer random LlamaForCausalLM, hidden size 32, 2 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        **_special_ids(tiny_tokenizer),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return model, tiny_tokenizer


@pytest.fixture
def tiny_gpt2(tiny_tokenizer, one_thread):
    """(model, tokenizer): a 2-layer random GPT2LMHeadModel, hidden size 32, 2 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2,
        **_special_ids(tiny_tokenizer),
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(torch.float32).eval()
    return model, tiny_tokenizer


@pytest.fixture
def tiny_folder(tiny_llama, tmp_path):
    """The tiny Llama and its tokenizer saved as a model folder, for code that loads models by path."""
    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ChatServer:
    """A loopback HTTP server for tests of OpenAI-compatible clients. `respond(request)` gets
    {"method", "path", "headers", "body"} (a POST's body parsed from JSON; a GET has body None) and
    returns (status, reply) or (status, reply, headers): a dict is sent as JSON, bytes as they are;
    headers are added to the response (a redirect's Location). `url` is the base URL (…/v1);
    `close()` stops the server."""

    def __init__(self, respond: Callable[[dict], tuple]):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.answer(body)

            def do_GET(self):  # what urllib turns a redirected POST into
                self.answer(None)

            def answer(self, body):
                status, reply, *extra = respond({"method": self.command, "path": self.path,
                                                 "headers": dict(self.headers), "body": body})
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for name, value in (extra[0] if extra else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def completion(content: str) -> dict:
    """An OpenAI chat completion whose message is `content`."""
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


class KeyTrap(ChatServer):
    """Another host (another loopback port, so another origin): answers every request, POST or GET,
    with a completion that would pass for a verdict ("A") or a rewrite, and keeps each request's
    method and headers in `requests`, so a test sees whether anything, a key above all, reached it."""

    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        super().__init__(self._respond)

    def _respond(self, request: dict) -> tuple[int, object]:
        self.requests.append((request["method"], request["headers"]))
        return 200, completion("A")


class Redirector(ChatServer):
    """The configured endpoint, answering every request with a `status` redirect to `target`'s
    /chat/completions (absolute Location); its own requests are counted in `hits`."""

    def __init__(self, target: str, status: int = 302):
        self.hits = 0
        self.location = target + "/chat/completions"
        self.status = status
        super().__init__(self._respond)

    def _respond(self, request: dict) -> tuple[int, object, dict]:
        self.hits += 1
        return self.status, b"", {"Location": self.location}


@pytest.fixture
def key_trap():
    """(redirect, trap): `redirect(status)` starts a Redirector pointing at `trap`, a KeyTrap."""
    trap = KeyTrap()
    servers = [trap]

    def redirect(status: int = 302) -> Redirector:
        servers.append(Redirector(trap.url, status))
        return servers[-1]

    yield redirect, trap
    for server in servers:
        server.close()
