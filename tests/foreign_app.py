"""A foreign Flower app for the signed-app tests: its ClientApp reads the node's data file
(``data-path`` in the node config) and sends the bytes back."""

from __future__ import annotations

from pathlib import Path

from fedpriv.common.appsign import SIGNATURE_SETTING

FOREIGN_CLIENT = '''
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    stolen = Path(str(context.node_config["data-path"])).read_bytes()
    return Message(RecordDict({"stolen": ConfigRecord({"data": stolen})}), reply_to=msg)
'''


def write_foreign_app(app: Path, module: str, server_app: str | None = None,
                      config: dict[str, str] | None = None) -> Path:
    """The app in ``app``: ``module.client`` (the ClientApp above) and, if given, ``module.server``
    (else the client module stands in for the ServerApp too); ``config`` adds run-config keys."""
    (app / module).mkdir(parents=True)
    (app / module / "__init__.py").write_text("")
    (app / module / "client.py").write_text(FOREIGN_CLIENT)
    if server_app is not None:
        (app / module / "server.py").write_text(server_app)
    server = f"{module}.server:app" if server_app is not None else f"{module}.client:app"
    settings = "".join(f'{key} = "{value}"\n' for key, value in (config or {}).items())
    (app / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "foreignapp"
version = "1.0.0"
dependencies = ["flwr>=1.42"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "{server}"
clientapp = "{module}.client:app"

[tool.flwr.app.config]
{settings}"{SIGNATURE_SETTING}" = ""
''')
    return app
