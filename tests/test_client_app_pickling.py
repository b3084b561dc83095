"""The ClientApp as Flower's simulation engine ships it: pickled into every message, inside a
closure (``vce_api.start_vce``'s ``_load``). fedpriv's app travels as the arguments it was made
from, and each process builds it once (clients/app.py, ``BuiltOnce``)."""

from __future__ import annotations

import cloudpickle
from flwr.clientapp import ClientApp

from fedpriv.clients.app import BuiltOnce, _build_client_app, built, make_client_app
from fedpriv.clients.trainer import get_trainer
from fedpriv.common.config import load_config
from fedpriv.common.presets import preset_layers


def _engine_closure(app):
    def _load():  # what Flower pickles with every message
        return app
    return _load


def test_the_client_app_travels_as_its_recipe_and_each_process_builds_it_once():
    cfg = load_config(preset_layers("quickstart"), [])
    app = make_client_app(cfg)
    shipped = cloudpickle.dumps(_engine_closure(app))
    first, second = cloudpickle.loads(shipped)(), cloudpickle.loads(shipped)()
    assert first is second  # the worker's second message finds the app already built
    assert isinstance(first, ClientApp) and not isinstance(first, BuiltOnce)
    assert first is built(app.recipe)
    # the app itself, pickled by value, is what each message would otherwise carry
    whole = cloudpickle.dumps(_engine_closure(_build_client_app(cfg, None, None, None, get_trainer)))
    assert len(shipped) < len(app.recipe) + 1_000 < len(whole)


def test_apps_made_from_different_arguments_stay_apart():
    quickstart = make_client_app(load_config(preset_layers("quickstart"), []))
    no_dp = make_client_app(load_config(preset_layers("no-dp"), []))
    assert quickstart.recipe != no_dp.recipe
    assert built(quickstart.recipe) is not built(no_dp.recipe)
