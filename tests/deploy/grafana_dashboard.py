"""What Grafana requires of deploy/grafana/dashboard.json, checked without a Grafana server (none can
be installed here: no reachable registry ships one).

The target is the Grafana of docker-compose.yml (grafana/grafana:12.0.0), which reads dashboards of
its classic JSON model (API v1, ``schemaVersion``; older ones are migrated when loaded). The JSON
Schema below is written from that model as Grafana's dashboard schema defines it (the ``Dashboard``,
``Panel``, ``GridPos``, ``FieldConfigSource``, ``ThresholdsConfig`` and Prometheus query
definitions), restricted to the keys this dashboard may use: a misspelt key is an error, as Grafana
would silently ignore it. :func:`problems` adds what a schema cannot say: panel types that Grafana
12 still ships (Angular panels such as ``graph`` are gone), Grafana unit ids, unique panel ids and
refIds, a grid of 24 columns without overlaps, thresholds in order, and only Grafana's own
variables in queries (the dashboard defines none).
"""

from __future__ import annotations

import re
from typing import Any

TARGET_GRAFANA = "12.0.0"
SCHEMA_VERSIONS = range(36, 42)  # Grafana 9 to 12.0 (from 36, datasource references are objects, as here)
GRID_COLUMNS = 24

# the core panel plugins of Grafana 12 (no Angular panels: graph, singlestat, table-old are gone)
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "piechart", "barchart", "histogram",
               "heatmap", "state-timeline", "status-history", "logs", "nodeGraph", "traces", "flamegraph",
               "geomap", "canvas", "news", "dashlist", "alertlist", "annolist", "xychart", "trend", "candlestick",
               "datagrid"}
# Grafana unit ids (packages/grafana-data valueFormats) this dashboard may use
UNITS = {"short", "none", "percent", "percentunit", "s", "ms", "reqps", "ops", "bytes", "dtdurations"}
# Grafana's global variables a Prometheus query may use
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s"}

_DS = {"type": "object", "additionalProperties": False, "required": ["type", "uid"],
       "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string", "minLength": 1}}}
_THRESHOLDS = {
    "type": "object", "additionalProperties": False, "required": ["mode", "steps"],
    "properties": {
        "mode": {"enum": ["absolute", "percentage"]},
        "steps": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["color", "value"],
            # null is -Infinity, as Grafana writes the base step
            "properties": {"color": {"type": "string"}, "value": {"type": ["number", "null"]}}}},
    },
}
_FIELD_CONFIG = {
    "type": "object", "additionalProperties": False, "required": ["defaults", "overrides"],
    "properties": {
        "defaults": {"type": "object", "additionalProperties": False, "properties": {
            "unit": {"type": "string"}, "decimals": {"type": "number"}, "min": {"type": "number"},
            "max": {"type": "number"}, "thresholds": _THRESHOLDS, "displayName": {"type": "string"},
            "noValue": {"type": "string"}, "mappings": {"type": "array"},
            "color": {"type": "object", "required": ["mode"]},
            "custom": {"type": "object"},
        }},
        "overrides": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["matcher", "properties"],
            "properties": {"matcher": {"type": "object", "required": ["id"]}, "properties": {"type": "array"}}}},
    },
}
_TARGET = {  # Grafana's Prometheus data query
    "type": "object", "additionalProperties": False, "required": ["refId", "expr"],
    "properties": {
        "refId": {"type": "string", "pattern": "^[A-Z]$"}, "datasource": _DS,
        "expr": {"type": "string", "minLength": 1}, "legendFormat": {"type": "string"},
        "format": {"enum": ["time_series", "table", "heatmap"]}, "instant": {"type": "boolean"},
        "range": {"type": "boolean"}, "interval": {"type": "string"}, "hide": {"type": "boolean"},
        "editorMode": {"enum": ["code", "builder"]}, "exemplar": {"type": "boolean"},
    },
}
_LEGEND = {"type": "object", "additionalProperties": False, "properties": {
    "displayMode": {"enum": ["list", "table", "hidden"]}, "placement": {"enum": ["bottom", "right"]},
    "calcs": {"type": "array", "items": {"type": "string"}}, "showLegend": {"type": "boolean"}}}
_OPTIONS = {
    "stat": {"type": "object", "additionalProperties": False, "properties": {
        "reduceOptions": {"type": "object", "additionalProperties": False, "required": ["calcs"], "properties": {
            "calcs": {"type": "array", "items": {"type": "string"}}, "fields": {"type": "string"},
            "values": {"type": "boolean"}}},
        "colorMode": {"enum": ["value", "background", "background_solid", "none"]},
        "graphMode": {"enum": ["area", "none"]}, "textMode": {"enum": ["auto", "value", "value_and_name", "name",
                                                                         "none"]},
        "justifyMode": {"enum": ["auto", "center"]}, "orientation": {"enum": ["auto", "horizontal", "vertical"]}}},
    "timeseries": {"type": "object", "additionalProperties": False, "properties": {
        "legend": _LEGEND, "tooltip": {"type": "object", "additionalProperties": False, "properties": {
            "mode": {"enum": ["single", "multi", "none"]}, "sort": {"enum": ["none", "asc", "desc"]}}}}},
    "table": {"type": "object", "additionalProperties": False, "properties": {
        "showHeader": {"type": "boolean"}, "cellHeight": {"enum": ["sm", "md", "lg"]},
        "footer": {"type": "object"}, "sortBy": {"type": "array"}}},
}
_PANEL = {
    "type": "object", "additionalProperties": False,
    "required": ["id", "type", "title", "datasource", "gridPos", "targets", "fieldConfig", "options"],
    "properties": {
        "id": {"type": "integer", "minimum": 1}, "type": {"type": "string"}, "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"}, "datasource": _DS,
        "gridPos": {"type": "object", "additionalProperties": False, "required": ["h", "w", "x", "y"], "properties": {
            "h": {"type": "integer", "minimum": 1}, "w": {"type": "integer", "minimum": 1, "maximum": GRID_COLUMNS},
            "x": {"type": "integer", "minimum": 0, "maximum": GRID_COLUMNS - 1}, "y": {"type": "integer", "minimum": 0}}},
        "targets": {"type": "array", "minItems": 1, "items": _TARGET},
        "fieldConfig": _FIELD_CONFIG, "options": {"type": "object"},
        "transformations": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "options"],
            "properties": {"id": {"type": "string"}, "options": {"type": "object"}, "disabled": {"type": "boolean"}}}},
        "interval": {"type": "string"}, "maxDataPoints": {"type": "number"}, "transparent": {"type": "boolean"},
        "pluginVersion": {"type": "string"}, "links": {"type": "array"},
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "additionalProperties": False,
    "required": ["uid", "title", "schemaVersion", "panels", "templating", "annotations", "time"],
    "properties": {
        "id": {"type": ["integer", "null"]},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "timezone": {"type": "string"}, "editable": {"type": "boolean"}, "graphTooltip": {"enum": [0, 1, 2]},
        "time": {"type": "object", "additionalProperties": False, "required": ["from", "to"],
                 "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "timepicker": {"type": "object"}, "fiscalYearStartMonth": {"type": "integer", "minimum": 0, "maximum": 11},
        "liveNow": {"type": "boolean"}, "weekStart": {"type": "string"},
        "refresh": {"anyOf": [{"type": "string", "pattern": r"^(\d+[smhd])?$"}, {"const": False}]},
        "schemaVersion": {"type": "integer"}, "version": {"type": "integer"},
        "panels": {"type": "array", "minItems": 1, "items": _PANEL},
        "templating": {"type": "object", "additionalProperties": False, "required": ["list"],
                       "properties": {"list": {"type": "array"}}},
        "annotations": {"type": "object", "additionalProperties": False, "required": ["list"],
                        "properties": {"list": {"type": "array"}}},
        "links": {"type": "array"},
    },
}

_VARIABLE = re.compile(r"\$(?:\{(\w+)[^}]*\}|(\w+))")


def problems(dashboard: dict[str, Any]) -> list[str]:
    """Everything Grafana 12 would refuse, ignore or draw wrong in ``dashboard``; [] when none.

    >>> [p for p in problems({"uid": "x"}) if "title" in p]
    ["schema: 'title' is a required property"]
    """
    import jsonschema

    out = [f"schema: {e.message}" + (f" (at {'/'.join(map(str, e.absolute_path))})" if e.absolute_path else "")
           for e in sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(dashboard), key=str)]
    if out:
        return out
    if dashboard["schemaVersion"] not in SCHEMA_VERSIONS:
        out.append(f"schemaVersion {dashboard['schemaVersion']} is not one Grafana {TARGET_GRAFANA} reads "
                   f"({SCHEMA_VERSIONS.start}-{SCHEMA_VERSIONS.stop - 1})")
    defined = {v.get("name") for v in dashboard["templating"]["list"]}
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        name = f"panel {panel['id']} ({panel['title']})"
        if panel["id"] in ids:
            out.append(f"{name}: id used twice")
        ids.add(panel["id"])
        if panel["type"] not in PANEL_TYPES:
            out.append(f"{name}: panel type {panel['type']!r} is not a Grafana {TARGET_GRAFANA} panel")
        schema = _OPTIONS.get(panel["type"])
        if schema is not None:
            import jsonschema

            for e in jsonschema.Draft202012Validator(schema).iter_errors(panel["options"]):
                out.append(f"{name}: options: {e.message}")
        unit = panel["fieldConfig"]["defaults"].get("unit")
        if unit is not None and unit not in UNITS:
            out.append(f"{name}: unit {unit!r} is not a Grafana unit id")
        steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        if steps and steps[0]["value"] is not None:
            out.append(f"{name}: the first threshold step must be the base (value null)")
        values = [s["value"] for s in steps[1:]]
        if None in values or values != sorted(values):
            out.append(f"{name}: threshold steps are not in ascending order")
        refs = [t["refId"] for t in panel["targets"]]
        if len(refs) != len(set(refs)):
            out.append(f"{name}: refIds repeat: {refs}")
        for t in panel["targets"]:
            for m in _VARIABLE.finditer(t["expr"]):
                var = m.group(1) or m.group(2)
                if var not in GRAFANA_VARIABLES and var not in defined:
                    out.append(f"{name}: query uses ${var}, which is neither Grafana's nor the dashboard's")
        g = panel["gridPos"]
        if g["x"] + g["w"] > GRID_COLUMNS:
            out.append(f"{name}: reaches column {g['x'] + g['w']} of {GRID_COLUMNS}")
        for x in range(g["x"], min(g["x"] + g["w"], GRID_COLUMNS)):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    out.append(f"{name}: overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = name
            else:
                continue
            break
    return out
