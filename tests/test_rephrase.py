import socket
import time

import pytest
from conftest import ChatServer

from learndyn.errors import LearndynError
from learndyn.probes.rephrase import (
    REPHRASERS,
    STYLES,
    LocalRephraser,
    OpenAIRephraser,
    clean_rewrite,
    make_rephraser,
    rephrase_messages,
)

KEY = "sk-test-0123456789secret"


class FakeServer(ChatServer):
    """An OpenAI-compatible endpoint on 127.0.0.1 whose replies each test scripts.

    `replies` is a list of (status, body) used in turn (the last one repeats); a body that is a
    dict is sent as JSON, bytes as they are. Every request is kept in `requests`.
    """

    def __init__(self):
        self.replies: list[tuple[int, object]] = [(200, _completion("ok"))]
        self.delay = 0.0
        self.requests: list[dict] = []
        super().__init__(self._respond)
        self.base_url = self.url

    def _respond(self, request: dict) -> tuple[int, object]:
        self.requests.append(request)
        time.sleep(self.delay)
        status, reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        return status, reply(request["body"]) if callable(reply) else reply


def _completion(content):
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def _echo(body):
    """Reply with the text to rewrite, upper-cased, wrapped like a chatty model would."""
    text = body["messages"][-1]["content"].rsplit("Text: ", 1)[1]
    return _completion(f'Rewritten text: "{text.upper()}"')


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("LEARNDYN_TEST_KEY", KEY)
    return "LEARNDYN_TEST_KEY"


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --- registry ---------------------------------------------------------------------------------------

def test_registry_lists_backends():
    assert set(REPHRASERS) == {"none", "local", "openai"}
    assert STYLES == ("semantic", "format")
    assert make_rephraser("none") is None


def test_unknown_backend_error_lists_valid_names():
    with pytest.raises(LearndynError) as err:
        make_rephraser("gpt-magic")
    message = str(err.value)
    assert "gpt-magic" in message and all(name in message for name in REPHRASERS)
    assert "\n" not in message


def test_bad_options_are_a_user_error():
    with pytest.raises(LearndynError, match="rephraser 'local'.*model"):
        make_rephraser("local")
    with pytest.raises(LearndynError, match="rephraser 'openai'.*colour"):
        make_rephraser("openai", base_url="http://x", model="m", colour="red")


def test_unknown_style_lists_styles():
    with pytest.raises(LearndynError, match="'poetic'.*semantic, format"):
        rephrase_messages("hello", "poetic")


def test_instructions_differ_by_style_and_hold_the_text():
    semantic = rephrase_messages("A horseshoe is metal.", "semantic")[0]["content"]
    form = rephrase_messages("A horseshoe is metal.", "format")[0]["content"]
    assert semantic != form
    for content in (semantic, form):
        assert content.endswith("Text: A horseshoe is metal.")
        assert "Reply with the rewritten text only." in content
    assert "same meaning" in semantic and "same format" in form


def test_clean_rewrite_strips_wrappers():
    assert clean_rewrite('Rewritten text: "A fishhook is sharp."') == "A fishhook is sharp."
    assert clean_rewrite("Here is the rewritten text:\n\nIt is sharp.") == "It is sharp."
    assert clean_rewrite("“Curly quotes.”") == "Curly quotes."
    assert clean_rewrite('"Hi," she said, "bye."') == '"Hi," she said, "bye."'
    assert clean_rewrite("   \n") == ""


# --- openai backend ---------------------------------------------------------------------------------

def test_openai_request_and_reply(server, api_key):
    server.replies = [(200, _echo)]
    rephraser = make_rephraser("openai", base_url=server.base_url + "/", model="gpt-test", api_key_env=api_key)
    texts = ["first answer", "second answer", "third answer"]
    assert rephraser(texts, "semantic") == ["FIRST ANSWER", "SECOND ANSWER", "THIRD ANSWER"]
    assert len(server.requests) == 3
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"]["model"] == "gpt-test"
    assert request["body"]["messages"][-1]["role"] == "user"
    assert sorted(r["body"]["messages"][-1]["content"].rsplit("Text: ", 1)[1] for r in server.requests) == texts


def test_openai_format_style_reaches_the_server(server, api_key):
    OpenAIRephraser(server.base_url, "m", api_key_env=api_key)(["x"], "format")
    assert "same format" in server.requests[0]["body"]["messages"][-1]["content"]


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("LEARNDYN_NO_SUCH_KEY", raising=False)
    with pytest.raises(LearndynError, match="LEARNDYN_NO_SUCH_KEY"):
        OpenAIRephraser("http://127.0.0.1:1/v1", "m", api_key_env="LEARNDYN_NO_SUCH_KEY")


def test_keyless_local_server_allowed(server, monkeypatch):
    monkeypatch.delenv("LEARNDYN_NO_SUCH_KEY", raising=False)
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env="LEARNDYN_NO_SUCH_KEY", require_key=False)
    assert rephraser(["a"], "semantic") == ["ok"]
    assert "Authorization" not in server.requests[0]["headers"]


def test_a_key_read_with_its_trailing_newline_works(server, monkeypatch):
    monkeypatch.setenv("LEARNDYN_TEST_KEY", KEY + "\n")  # KEY="$(cat key.txt)" keeps no newline, .env files may
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env="LEARNDYN_TEST_KEY", timeout=5, max_retries=0)
    assert rephraser(["a"], "semantic") == ["ok"]
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("bad", [KEY + "\nX", KEY[:6] + " " + KEY[6:], KEY + "\u2013"])
def test_a_malformed_key_is_one_line_that_does_not_show_it(monkeypatch, bad):
    monkeypatch.setenv("LEARNDYN_TEST_KEY", bad)  # http.client's ValueError quoted the whole header
    with pytest.raises(LearndynError) as err:
        OpenAIRephraser("http://127.0.0.1:1/v1", "m", api_key_env="LEARNDYN_TEST_KEY")
    assert "LEARNDYN_TEST_KEY" in str(err.value) and KEY[:10] not in str(err.value)


def test_key_hidden_from_repr(api_key):
    rephraser = OpenAIRephraser("http://127.0.0.1:1/v1", "m", api_key_env=api_key)
    assert KEY not in repr(rephraser) and KEY not in str(rephraser)
    assert api_key in repr(rephraser)


def test_server_errors_retried_then_one_line_error(server, api_key):
    server.replies = [(500, {"error": {"message": "boom"}})]
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env=api_key, max_retries=2, backoff=0)
    with pytest.raises(LearndynError) as err:
        rephraser(["a"], "semantic")
    message = str(err.value)
    assert len(server.requests) == 3  # first try + 2 retries
    assert server.base_url + "/chat/completions" in message and "HTTP 500" in message
    assert "\n" not in message and "Traceback" not in message and KEY not in message


def test_rate_limit_then_success(server, api_key):
    server.replies = [(429, {"error": {"message": "slow down"}}), (503, b"busy"), (200, _completion("fine"))]
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env=api_key, max_retries=3, backoff=0)
    assert rephraser(["a"], "semantic") == ["fine"]
    assert len(server.requests) == 3


def test_client_error_not_retried_and_key_redacted(server, api_key):
    server.replies = [(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})]
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env=api_key, max_retries=3, backoff=0)
    with pytest.raises(LearndynError) as err:
        rephraser(["a"], "semantic")
    assert len(server.requests) == 1
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value)


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_is_refused_and_nothing_reaches_the_other_host(key_trap, api_key, status):
    redirect, trap = key_trap
    origin = redirect(status)
    rephraser = OpenAIRephraser(origin.url, "m", api_key_env=api_key, timeout=5, max_retries=2, backoff=0)
    with pytest.raises(LearndynError) as err:
        rephraser(["a"], "semantic")
    message = str(err.value)
    assert trap.requests == []  # not the key, not a request at all
    assert origin.hits == 1  # a redirect is not retried
    host = trap.url.removesuffix("/v1")
    assert f"HTTP {status} redirect to {host}," in message and origin.url + "/chat/completions" in message
    assert KEY not in message and "/chat/completions" not in message.split(" redirect ", 1)[1]
    assert "\n" not in message


def test_a_key_the_server_echoes_is_redacted_from_the_rewrites(server, api_key):
    server.replies = [(200, _completion(f"Your key {KEY} works; {KEY}."))]
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env=api_key, timeout=5, max_retries=0)
    assert rephraser(["a", "b"], "semantic") == ["Your key *** works; ***."] * 2


def test_a_placeholder_key_is_not_a_secret_and_the_rewrite_stays_whole(server, monkeypatch):
    monkeypatch.setenv("LEARNDYN_TEST_KEY", "x")  # "any value will do" for a keyless local server
    server.replies = [(200, _completion("x marks the spot"))]
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env="LEARNDYN_TEST_KEY", timeout=5, max_retries=0)
    assert rephraser(["a"], "semantic") == ["x marks the spot"]
    assert server.requests[0]["headers"]["Authorization"] == "Bearer x"


def test_connection_refused(api_key):
    url = closed_port_url()
    rephraser = OpenAIRephraser(url, "m", api_key_env=api_key, max_retries=1, backoff=0)
    with pytest.raises(LearndynError) as err:
        rephraser(["a", "b"], "semantic")
    message = str(err.value)
    assert url + "/chat/completions" in message and "connection refused" in message
    assert KEY not in message and "\n" not in message


def test_timeout(server, api_key):
    server.delay = 0.5
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env=api_key, timeout=0.1, max_retries=0)
    with pytest.raises(LearndynError, match="timed out"):
        rephraser(["a"], "semantic")


@pytest.mark.parametrize("reply", [b"<html>not json</html>", {"choices": []}, {"unexpected": True}])
def test_bad_reply_is_a_clear_error(server, api_key, reply):
    server.replies = [(200, reply)]
    rephraser = OpenAIRephraser(server.base_url, "m", api_key_env=api_key, max_retries=0)
    with pytest.raises(LearndynError, match="chat/completions: (the reply is not JSON|unexpected reply)"):
        rephraser(["a"], "semantic")


def test_bad_base_url(api_key):
    with pytest.raises(LearndynError, match="base_url"):
        OpenAIRephraser("localhost:8000", "m", api_key_env=api_key)


# --- local backend ----------------------------------------------------------------------------------

def test_local_rephraser_one_string_per_input(tiny_llama):
    model, tokenizer = tiny_llama
    rephraser = make_rephraser("local", model=model, tokenizer=tokenizer, max_new_tokens=8, batch_size=2)
    assert isinstance(rephraser, LocalRephraser)
    texts = ["A horseshoe protects the hoof.", "Tea is steeped for three minutes.", "Yes."]
    for style in STYLES:
        out = rephraser(texts, style)
        assert len(out) == len(texts) and all(isinstance(t, str) for t in out)
    assert rephraser(texts, "semantic") == rephraser(texts, "semantic")  # greedy: deterministic
    with pytest.raises(LearndynError, match="style"):
        rephraser(texts, "poetic")


def test_local_rephraser_needs_a_chat_template(tiny_llama):
    model, tokenizer = tiny_llama
    tokenizer.chat_template = None
    with pytest.raises(LearndynError, match="chat_template"):
        LocalRephraser(model, tokenizer)
