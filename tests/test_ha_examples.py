"""The Home Assistant examples, run the way Home Assistant runs them, through the real bridge.

Each package in docs/examples/homeassistant/ is loaded as YAML and its scripts and automations
are executed by a small interpreter of the few actions they use:

- templates render like Home Assistant renders them: a sandboxed Jinja environment with its
  `to_json`/`from_json` filters and `now()`/`states()`, native result types (its
  `literal_eval` step, dict results whose `str()` is the rendered text), the 256 KiB output
  limit; undefined names fail (stricter than Home Assistant, which renders them empty);
- `mqtt.publish` publishes the payload as `cv.string` makes it to a real Mosquitto, the real
  bridge calls the HTTP stand-in;
- `wait_for_trigger` matches replies like the MQTT trigger (value_template against payload);
- `shell_command` runs like Home Assistant runs it: split at the first space, the rest a
  template, shlex-split, executed without a shell; paths under /media map to a temp directory.

Templates that consume replies (the sensors, the image entity) are rendered against the reply
that actually came back. Nothing here proves behaviour inside a real Home Assistant.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import subprocess
import uuid
from ast import literal_eval
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config
from support.broker import MosquittoBroker, MosquittoNotInstalled
from support.mqtt_client import TestClient
from support.standin import RecordedRequest, Reply, Standin

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "homeassistant"
COMMON = "openai_bridge"

# ------------------------------------------------------------------ Home Assistant's templates

MAX_TEMPLATE_OUTPUT = 256 * 1024
_IS_NUMERIC = re.compile(r"^[+-]?(?!0\d)\d*(?:\.\d*)?$")


class TemplateError(Exception):
    """A template failed to render (Home Assistant's `TemplateError`)."""


class ResultWrapper:
    """Marks a parsed container result that remembers the text it was parsed from."""

    render_result: str | None


def _wrapper(kls: type) -> type:
    class Wrapper(kls, ResultWrapper):  # type: ignore[misc]
        def __init__(self, *args: Any, render_result: str | None = None) -> None:
            super().__init__(*args)
            self.render_result = render_result

        def __str__(self) -> str:
            return super().__str__() if self.render_result is None else self.render_result

    return Wrapper


class _TupleWrapper(tuple, ResultWrapper):  # type: ignore[type-arg]
    def __new__(cls, value: tuple[Any, ...], *, render_result: str | None = None) -> Any:
        return super().__new__(cls, tuple(value))

    def __init__(self, value: tuple[Any, ...], *, render_result: str | None = None) -> None:
        self.render_result = render_result

    def __str__(self) -> str:
        return super().__str__() if self.render_result is None else self.render_result


_RESULT_WRAPPERS: dict[type, type] = {k: _wrapper(k) for k in (dict, list, set)}
_RESULT_WRAPPERS[tuple] = _TupleWrapper


def parse_result(text: str) -> Any:
    """Home Assistant's native-type step: a Python literal becomes its value, else the text."""
    try:
        result = literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError):
        return text
    if type(result) in _RESULT_WRAPPERS:
        result = _RESULT_WRAPPERS[type(result)](result, render_result=text)
    if not isinstance(result, str | complex) and (
        not isinstance(result, int | float)
        or isinstance(result, bool)
        or _IS_NUMERIC.match(text) is not None
    ):
        return result
    return text


def is_template_string(text: str) -> bool:
    """Whether Home Assistant treats `text` as a template (else it is static)."""
    return "{" in text and ("{%" in text or "{{" in text or "{#" in text)


def cv_string(value: Any) -> str:
    """`cv.string`: what a service's string field (mqtt.publish's payload) makes of a value."""
    if value is None:
        raise ValueError("string value is None")
    if isinstance(value, str | ResultWrapper):
        return str(value)
    if isinstance(value, list | dict):
        raise ValueError("value should be a string")
    return str(value)


def _to_json(value: Any, ensure_ascii: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, separators=(",", ":"))


class HaTemplates:
    """Renders templates as Home Assistant does; `states` answers `states('<entity>')`."""

    def __init__(self, states: Mapping[str, str] | None = None) -> None:
        self.states = dict(states or {})
        env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined, extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]
        )
        env.filters["to_json"] = _to_json
        env.filters["from_json"] = json.loads
        env.filters["base64_encode"] = lambda v: base64.b64encode(str(v).encode()).decode()
        env.filters["base64_decode"] = lambda v: base64.b64decode(v).decode()
        env.globals["now"] = lambda: datetime.now().astimezone()
        env.globals["states"] = lambda entity_id: self.states.get(entity_id, "unknown")
        self.env = env

    def render(self, template: str, variables: Mapping[str, Any], *, parse: bool = True) -> Any:
        """Render one template; `parse` applies the native-type step (off for MQTT templates)."""
        source = template.strip()
        if not is_template_string(template):
            return parse_result(source) if parse else source
        try:
            text = self.env.from_string(source).render(**variables)
        except Exception as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc}") from exc
        if len(text) > MAX_TEMPLATE_OUTPUT:
            raise TemplateError(
                f"Template output exceeded maximum size of {MAX_TEMPLATE_OUTPUT} characters"
            )
        text = text.strip()
        return parse_result(text) if parse else text

    def render_complex(self, value: Any, variables: Mapping[str, Any]) -> Any:
        """Render every string inside lists and mappings (keys too), like `render_complex`."""
        if isinstance(value, list):
            return [self.render_complex(item, variables) for item in value]
        if isinstance(value, Mapping):
            return {
                self.render_complex(k, variables): self.render_complex(v, variables)
                for k, v in value.items()
            }
        if isinstance(value, str):
            return self.render(value, variables)
        return value

    def mqtt_value(self, template: str, payload: str | bytes) -> str:
        """An MQTT entity or trigger template on a payload: `value`, and `value_json` if JSON."""
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        variables: dict[str, Any] = {"value": text}
        with contextlib.suppress(ValueError):
            variables["value_json"] = json.loads(text)
        result: str = self.render(template, variables, parse=False)
        return result


# ------------------------------------------------------------------------ the example packages


def load_package(name: str) -> dict[str, Any]:
    """One example package (a YAML file under docs/examples/homeassistant/)."""
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict), name
    return data


def merged(*names: str) -> dict[str, Any]:
    """Packages merged like Home Assistant merges them (lists joined, duplicate keys refused)."""
    out: dict[str, Any] = {}
    for name in names:
        for domain, conf in load_package(name).items():
            if domain == "automation":
                out.setdefault(domain, []).extend(conf)
            elif domain == "mqtt":
                platforms = out.setdefault(domain, {})
                for platform, items in conf.items():
                    platforms.setdefault(platform, []).extend(items)
            else:
                target = out.setdefault(domain, {})
                assert not set(target) & set(conf), f"{name}: duplicate {domain} keys"
                target.update(conf)
    return out


def all_steps(steps: list[Any]) -> Iterator[dict[str, Any]]:
    """Every step of an action list, nested `then`/`else` included."""
    for step in steps:
        yield step
        for branch in ("then", "else"):
            yield from all_steps(step.get(branch, []))


def action_lists(package: Mapping[str, Any]) -> Iterator[list[Any]]:
    """The action lists of a package's scripts and automations."""
    for script in package.get("script", {}).values():
        yield script["sequence"]
    for automation in package.get("automation", []):
        yield automation["actions"]


def mqtt_entity(package: Mapping[str, Any], platform: str, unique_id: str) -> dict[str, Any]:
    """The manually configured MQTT entity with `unique_id`."""
    for item in package["mqtt"][platform]:
        if item["unique_id"] == unique_id:
            assert isinstance(item, dict)
            return item
    raise KeyError(unique_id)


# -------------------------------------------------------------------- the script interpreter


class ScriptError(Exception):
    """A `stop` with `error: true`, or an action that failed."""


class _Stop(Exception):
    def __init__(self, response: Any) -> None:
        super().__init__("stop")
        self.response = response


@dataclass
class Call:
    """One action the script performed."""

    action: str
    data: dict[str, Any]
    target: dict[str, Any]


@dataclass
class HaRunner:
    """Runs a package's scripts and automations against the broker `client` is connected to."""

    package: dict[str, Any]
    client: TestClient
    workdir: Path
    templates: HaTemplates = field(default_factory=HaTemplates)
    snapshots: dict[str, bytes] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    _mark: int = 0

    @property
    def media(self) -> Path:
        """Where `/media/...` paths land."""
        return self.workdir / "media"

    def local(self, value: Any) -> Any:
        """`/media/...` strings (and those inside data) mapped into the work directory."""
        if isinstance(value, str) and value.startswith("/media/"):
            return str(self.media / value.removeprefix("/media/"))
        if isinstance(value, Mapping):
            return {k: self.local(v) for k, v in value.items()}
        return value

    def run_script(self, name: str, **fields: Any) -> Any:
        """Run `script.<name>` with `fields`; its response (or None)."""
        script = self.package["script"][name]
        variables: dict[str, Any] = {**fields, "context": _context(), "this": {}}
        for key, value in script.get("variables", {}).items():
            variables[key] = self.templates.render_complex(value, variables)
        return self._run(script["sequence"], variables)

    def run_automation(self, automation_id: str, trigger: dict[str, Any]) -> None:
        """Run an automation's actions as if `trigger` had fired."""
        [automation] = [a for a in self.package["automation"] if a["id"] == automation_id]
        variables = {"trigger": trigger, "context": _context(), "this": {}}
        self._run(automation["actions"], variables)

    def _run(self, steps: list[Any], variables: dict[str, Any]) -> Any:
        try:
            self._steps(steps, variables)
        except _Stop as stop:
            return stop.response
        return None

    def _steps(self, steps: list[Any], variables: dict[str, Any]) -> None:
        for step in steps:
            if "action" in step:
                self._action(step, variables)
            elif "variables" in step:
                for key, value in step["variables"].items():
                    variables[key] = self.templates.render_complex(value, variables)
            elif "wait_for_trigger" in step:
                self._wait(step, variables)
            elif "if" in step:
                conditions = step["if"] if isinstance(step["if"], list) else [step["if"]]
                chosen = all(self._condition(c, variables) for c in conditions)
                self._steps(step.get("then" if chosen else "else", []), variables)
            elif "stop" in step:
                if step.get("error"):
                    raise ScriptError(step["stop"])
                name = step.get("response_variable")
                response = variables[name] if name else None
                assert response is None or isinstance(response, Mapping), response
                raise _Stop(response)
            else:
                raise AssertionError(f"step not supported by the test interpreter: {step}")

    def _condition(self, condition: Any, variables: Mapping[str, Any]) -> bool:
        template = condition if isinstance(condition, str) else condition["value_template"]
        text: str = self.templates.render(template, variables, parse=False)
        return text.lower() == "true"

    def _action(self, step: dict[str, Any], variables: dict[str, Any]) -> None:
        action: str = step["action"]
        data = self.templates.render_complex(step.get("data", {}), variables)
        target = self.templates.render_complex(step.get("target", {}), variables)
        response: Any = None
        if action == "mqtt.publish":
            payload = cv_string(data["payload"]).encode("utf-8")
            self._mark = self.client.mark()
            self.client.publish(
                cv_string(data["topic"]),
                payload,
                qos=int(data.get("qos", 0)),
                retain=bool(data.get("retain", False)),
            )
        elif action.startswith("shell_command."):
            command = self.package["shell_command"][action.partition(".")[2]]
            response = self._shell(command, self.local(data))
        elif action == "camera.snapshot":
            path = Path(self.local(data["filename"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.snapshots[target["entity_id"]])
        self.calls.append(Call(action, data, target))
        if name := step.get("response_variable"):
            variables[name] = response

    def _shell(self, command: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """shell_command as Home Assistant runs it (its response dict)."""
        prog, _, args = command.partition(" ")
        rendered = self.templates.render(args, data, parse=False) if args else None
        if rendered == args:
            proc = subprocess.run(
                command, shell=True, cwd=self.workdir, capture_output=True, timeout=60, check=False
            )
        else:
            argv = [prog, *shlex.split(rendered or "")]
            proc = subprocess.run(
                argv, cwd=self.workdir, capture_output=True, timeout=60, check=False
            )
        return {
            "stdout": proc.stdout.decode("utf-8").strip(),
            "stderr": proc.stderr.decode("utf-8").strip(),
            "returncode": proc.returncode,
        }

    def _wait(self, step: dict[str, Any], variables: dict[str, Any]) -> None:
        """wait_for_trigger with one MQTT trigger; messages since the last publish count."""
        [trigger] = step["wait_for_trigger"]
        assert trigger["trigger"] == "mqtt"
        topic: str = self.templates.render(trigger["topic"], variables, parse=False)
        wanted = (
            self.templates.render(trigger["payload"], variables, parse=False)
            if "payload" in trigger
            else None
        )
        value_template = trigger.get("value_template")

        def fires(message: Any) -> bool:
            if not paho.topic_matches_sub(topic, message.topic):
                return False
            value: str | None = message.payload.decode("utf-8")
            if value_template is not None:
                try:
                    value = self.templates.mqtt_value(value_template, message.payload)
                except TemplateError:
                    value = None  # the trigger's error_value
            return wanted is None or wanted == value

        timeout = min(float(step.get("timeout", 30)), 15.0)
        try:
            [message] = self.client.wait_for(topic, 1, timeout, after=self._mark, where=fires)
        except TimeoutError:
            variables["wait"] = {"remaining": 0, "trigger": None}
            if not step.get("continue_on_timeout", True):
                raise _Stop(None) from None
            return
        data: dict[str, Any] = {
            "platform": "mqtt",
            "topic": message.topic,
            "payload": message.payload.decode("utf-8"),
            "qos": message.qos,
            "description": f"mqtt topic {message.topic}",
            "id": "0",
        }
        with contextlib.suppress(ValueError):
            data["payload_json"] = json.loads(message.payload)
        variables["wait"] = {"remaining": timeout, "trigger": data}


def _context() -> SimpleNamespace:
    return SimpleNamespace(id=uuid.uuid4().hex[:26].upper(), parent_id=None, user_id=None)


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ha_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A Mosquitto for this module alone: the examples use the real "openai" prefix."""
    try:
        broker = MosquittoBroker(tmp_path_factory.mktemp("ha-mosquitto"))
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@dataclass
class Harness:
    """A running bridge (prefix "openai") and an MQTT client standing in for Home Assistant."""

    client: TestClient
    standin: Standin
    workdir: Path

    def runner(self, *packages: str, **kwargs: Any) -> HaRunner:
        """An interpreter for `packages` merged with the common one."""
        return HaRunner(merged(COMMON, *packages), self.client, self.workdir, **kwargs)


@pytest.fixture
def ha(tmp_path: Path, ha_broker: MosquittoBroker, standin: Standin) -> Iterator[Harness]:
    """The bridge and a client subscribed like openai_bridge.yaml's reply sensor."""
    path, env = make_config(
        tmp_path, broker_port=ha_broker.port, api_base=standin.url, prefix="openai"
    )
    bridge = BridgeThread.from_file(path, env).start()
    try:
        with TestClient.for_broker(ha_broker, prefix="openai") as client:
            reply_sensor = mqtt_entity(load_package(COMMON), "sensor", "openai_bridge_last_reply")
            client.subscribe(reply_sensor["state_topic"])
            workdir = tmp_path / "config"
            workdir.mkdir()
            yield Harness(client, standin, workdir)
            for message in client.messages("#"):
                assert TEST_API_KEY.encode() not in message.payload
    finally:
        bridge.stop()
    assert TEST_API_KEY not in bridge.log_text()


def completion(content: str | None, refusal: str | None = None) -> dict[str, Any]:
    """A chat completion object with one assistant message."""
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def only_request(standin: Standin) -> RecordedRequest:
    """The one request the stand-in received."""
    [request] = standin.requests
    return request


# --------------------------------------------------------------------------------------- tests

EXERCISED = {
    ("openai_ask", "openai/request/createChatCompletion/ha"),
    ("openai_speech", "openai/request/createSpeech/ha"),
    ("openai_transcribe", "openai/request/createTranscription/ha"),
    ("openai_describe_image", "openai/request/createChatCompletion/ha/vision"),
    ("openai_generate_image", "openai/request/createImage/ha"),
    ("openai_structured_sensor", "openai/request/createChatCompletion/ha/comfort"),
}


def test_every_example_publish_is_exercised_and_its_reply_is_subscribed() -> None:
    found = set()
    replies_filter = mqtt_entity(load_package(COMMON), "sensor", "openai_bridge_last_reply")[
        "state_topic"
    ]
    for path in sorted(EXAMPLES.glob("*.yaml")):
        package = load_package(path.stem)
        for actions in action_lists(package):
            steps = list(all_steps(actions))
            publishes = [s for s in steps if s.get("action") == "mqtt.publish"]
            waits = [s for s in steps if "wait_for_trigger" in s]
            for publish in publishes:
                topic = publish["data"]["topic"]
                found.add((path.stem, topic))
                reply = topic.replace("openai/request/", "openai/response/", 1)
                assert paho.topic_matches_sub(replies_filter, reply), reply
            for wait in waits:
                [trigger] = wait["wait_for_trigger"]
                assert trigger["topic"] in {
                    p["data"]["topic"].replace("/request/", "/response/", 1) for p in publishes
                }
    assert found == EXERCISED


def test_ask_returns_the_answer_to_its_own_transaction(
    ha: Harness, ha_broker: MosquittoBroker
) -> None:
    runner = ha.runner("openai_ask")
    question = 'Was heißt "Föhn"?\nKurz, bitte.'

    def answer(request: RecordedRequest) -> Reply:
        # Another script's reply on the same topic comes first and must be passed over.
        with TestClient.for_broker(ha_broker) as other:
            other.publish(
                "openai/response/createChatCompletion/ha",
                {"status": "ok", "method": "createChatCompletion", "transaction": "ha-other"},
            )
        return Reply(json=completion("Ein warmer Fallwind."))

    ha.standin.script("POST", "/chat/completions", answer)
    result = runner.run_script("openai_ask", question=question)

    assert result == {"ok": True, "answer": "Ein warmer Fallwind."}
    sent = only_request(ha.standin).json()
    assert sent["model"] == "gpt-4o-mini"
    assert sent["messages"][1] == {"role": "user", "content": question}
    assert "transaction" not in sent
    decoys = ha.client.messages("openai/response/createChatCompletion/ha")
    assert json.loads(decoys[0].payload)["transaction"] == "ha-other"

    # openai_bridge.yaml's "last reply" sensor, rendered on the reply that came back.
    sensor = mqtt_entity(runner.package, "sensor", "openai_bridge_last_reply")
    reply = decoys[-1].payload
    templates = runner.templates
    assert templates.mqtt_value(sensor["value_template"], reply) == "ok"
    attributes = json.loads(templates.mqtt_value(sensor["json_attributes_template"], reply))
    assert attributes["method"] == "createChatCompletion" and attributes["error"] is None
    assert attributes["transaction"].startswith("ha-")


def test_ask_reports_an_api_error(ha: Harness) -> None:
    ha.standin.script("POST", "/chat/completions", Reply.error(401, "Incorrect API key provided"))
    result = ha.runner("openai_ask").run_script("openai_ask", question="hi")
    assert result["ok"] is False and "Incorrect API key" in result["error"]


def test_speech_is_decoded_to_a_file_and_played(ha: Harness) -> None:
    audio = os.urandom(150_000)  # base64 > 128 KiB: needs the split arguments
    ha.standin.script("POST", "/audio/speech", Reply(body=audio, content_type="audio/mpeg"))
    runner = ha.runner("openai_speech")

    runner.run_script("openai_say", text="Die Wäsche ist fertig.", media_player="media_player.k")

    sent = only_request(ha.standin).json()
    assert sent == {
        "model": "tts-1",
        "voice": "alloy",
        "input": "Die Wäsche ist fertig.",
        "response_format": "mp3",
    }
    assert (runner.media / "openai" / "speech.mp3").read_bytes() == audio
    play = runner.calls[-1]
    assert play.action == "media_player.play_media"
    assert play.target == {"entity_id": "media_player.k"}
    assert play.data["media_content_id"] == "media-source://media_source/local/openai/speech.mp3"


def test_speech_beyond_the_template_limit_fails_as_documented(ha: Harness) -> None:
    ha.standin.script(
        "POST", "/audio/speech", Reply(body=b"\0" * 200_000, content_type="audio/mpeg")
    )
    with pytest.raises(TemplateError, match="exceeded maximum size"):
        ha.runner("openai_speech").run_script("openai_say", text="long", media_player="m.x")


def test_speech_error_reply_stops_the_script(ha: Harness) -> None:
    ha.standin.script("POST", "/audio/speech", Reply.error(400, "bad voice"))
    runner = ha.runner("openai_speech")
    with pytest.raises(ScriptError, match="createSpeech failed"):
        runner.run_script("openai_say", text="x", media_player="m.x")
    assert [c.action for c in runner.calls] == ["mqtt.publish"]


@pytest.mark.parametrize("language", [None, "de"])
def test_transcription_of_a_recorded_file(ha: Harness, language: str | None) -> None:
    recording = os.urandom(120_000)
    runner = ha.runner("openai_transcribe")
    (runner.media / "openai").mkdir(parents=True)
    (runner.media / "openai" / "recording.wav").write_bytes(recording)
    ha.standin.script("POST", "/audio/transcriptions", Reply(json={"text": "Licht an."}))

    fields: dict[str, Any] = {"path": "/media/openai/recording.wav"}
    if language:
        fields["language"] = language
    result = runner.run_script("openai_transcribe", **fields)

    assert result == {"ok": True, "text": "Licht an."}
    request = only_request(ha.standin)
    part = request.part("file")
    assert (part.filename, part.data) == ("recording.wav", recording)
    form = dict(request.form())
    assert form["model"] == "gpt-4o-mini-transcribe"
    assert form.get("language") == language


def test_transcription_of_a_missing_file_stops(ha: Harness) -> None:
    runner = ha.runner("openai_transcribe")
    with pytest.raises(ScriptError, match="cannot read the file"):
        runner.run_script("openai_transcribe", path="/media/openai/none.wav")
    assert ha.standin.requests == []


def test_camera_picture_is_described(ha: Harness) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + os.urandom(60_000) + b"\xff\xd9"
    runner = ha.runner("openai_describe_image", snapshots={"camera.door": jpeg})
    ha.standin.script("POST", "/chat/completions", Reply(json=completion("A parcel.")))

    result = runner.run_script(
        "openai_describe_camera", camera="camera.door", question="Any parcel?"
    )

    assert result == {"ok": True, "answer": "A parcel."}
    sent = only_request(ha.standin).json()
    text, image = sent["messages"][0]["content"]
    assert text == {"type": "text", "text": "Any parcel?"}
    expected = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert image == {"type": "image_url", "image_url": {"url": expected}}
    assert sent["max_tokens"] == 300


def test_image_generation_and_the_image_entity(ha: Harness) -> None:
    url = "https://images.example.invalid/img-1.png?sig=a%2Bb&exp=1"
    ha.standin.script(
        "POST",
        "/images/generations",
        Reply(json={"created": 1, "data": [{"url": url, "revised_prompt": "x"}]}),
    )
    runner = ha.runner("openai_generate_image")

    result = runner.run_script("openai_generate_image", prompt="Our house in the snow")

    assert result == {"ok": True, "url": url}
    assert only_request(ha.standin).json() == {
        "model": "dall-e-3",
        "prompt": "Our house in the snow",
        "size": "1024x1024",
        "response_format": "url",
    }
    entity = mqtt_entity(runner.package, "image", "openai_generated_image")
    [reply] = ha.client.messages(entity["url_topic"])
    assert runner.templates.mqtt_value(entity["url_template"], reply.payload) == url
    failed = {"status": "error", "method": "createImage", "error": {"code": "x", "message": "y"}}
    assert runner.templates.mqtt_value(entity["url_template"], json.dumps(failed)) == ""


def test_structured_output_feeds_the_sensor(ha: Harness) -> None:
    templates = HaTemplates(
        {"sensor.living_room_temperature": "23.5", "sensor.living_room_humidity": "61"}
    )
    runner = ha.runner("openai_structured_sensor", templates=templates)
    answer = {"score": 7, "reason": "Warm and a bit humid."}
    ha.standin.script(
        "POST",
        "/chat/completions",
        Reply(json=completion(json.dumps(answer))),
        Reply.error(400, "Invalid schema for response_format"),
    )
    sensor = mqtt_entity(runner.package, "sensor", "openai_living_room_comfort")
    topic = sensor["state_topic"]
    trigger = {"platform": "time_pattern", "now": datetime.now().astimezone()}

    runner.run_automation("openai_living_room_comfort", trigger)
    [reply] = ha.client.wait_for(topic, 1)

    sent = only_request(ha.standin).json()
    assert sent["messages"][1]["content"] == "Living room: 23.5 °C, 61 % relative humidity."
    schema = sent["response_format"]["json_schema"]
    assert schema["strict"] is True and schema["schema"]["required"] == ["score", "reason"]
    assert templates.mqtt_value(sensor["value_template"], reply.payload) == "7"
    attributes = templates.mqtt_value(sensor["json_attributes_template"], reply.payload)
    assert json.loads(attributes) == answer

    # An error reply renders an empty state, which a numeric MQTT sensor ignores.
    after = ha.client.mark()
    runner.run_automation("openai_living_room_comfort", trigger)
    [error] = ha.client.wait_for(topic, 1, after=after)
    assert templates.mqtt_value(sensor["value_template"], error.payload) == ""
    attributes = templates.mqtt_value(sensor["json_attributes_template"], error.payload)
    assert json.loads(attributes) == {
        "error": "service host answered HTTP 400 Bad Request: Invalid schema for response_format"
    }

    refused = {"status": "ok", "method": "createChatCompletion", "data": completion(None, "No.")}
    assert templates.mqtt_value(sensor["value_template"], json.dumps(refused)) == ""
    attributes = templates.mqtt_value(sensor["json_attributes_template"], json.dumps(refused))
    assert json.loads(attributes) == {"refusal": "No."}


def test_template_rendering_follows_home_assistant() -> None:
    templates = HaTemplates()
    assert templates.render("{{ 1 + 1 }}", {}) == 2
    assert templates.render("{{ '007' }}", {}) == "007"
    assert templates.render("{{ [1, 2] }}", {}) == [1, 2]
    parsed = templates.render('{{ {"a": none} | to_json }}', {})
    assert cv_string(parsed) == '{"a":null}'
    parsed = templates.render('{{ {"a": 1} | to_json }}', {})
    assert isinstance(parsed, dict) and cv_string(parsed) == '{"a":1}'
    assert templates.render("plain", {}) == "plain"
    with pytest.raises(TemplateError):
        templates.render("{{ 'x' * 300000 }}", {})
    with pytest.raises(TemplateError):
        templates.render("{{ missing.attribute }}", {})
