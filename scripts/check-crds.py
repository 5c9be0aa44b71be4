#!/usr/bin/env python3
"""Checks the custom resources in rendered manifests offline: KEDA ScaledObject, Istio DestinationRule,
VirtualService, PeerAuthentication and AuthorizationPolicy, Prometheus Operator PodMonitor and
PrometheusRule. kubernetes-validate has no schemas for them, so this checks what their CRDs would: the
apiVersion, required fields, the allowed keys at every level we use (a typo such as `consecutive5xxError`
would otherwise be dropped silently by the API server), enumerations, and a few rules the projects
document (Istio rejects a route timeout below 1 ms; consecutiveLocalOriginFailures needs
splitExternalLocalOriginErrors; a PrometheusRule rule is a record or an alert, annotations only on
alerts). Usage: check-crds.py FILE... (exit 1 on the first problems found, listing them all).
"""
import re
import sys

import yaml

ANY = object()  # any value, not checked further


def duration_ms(v):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(v))
    if not m:
        return None
    return float(m.group(1)) * {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}[m.group(2)]


# Schemas: dict = an object whose keys must be among these (value: the schema of the value);
# [schema] = a list of items; a set = one of these values; type = a scalar of that type; ANY.
DURATION = "duration"
SCALED_OBJECT = {
    "scaleTargetRef": {"name": str, "apiVersion": str, "kind": str, "envSourceContainerName": str},
    "minReplicaCount": int, "maxReplicaCount": int, "idleReplicaCount": int, "pollingInterval": int,
    "cooldownPeriod": int, "initialCooldownPeriod": int,
    "advanced": {"restoreToOriginalReplicaCount": bool, "horizontalPodAutoscalerConfig": {"name": str, "behavior": ANY},
                 "scalingModifiers": ANY},
    "fallback": {"failureThreshold": int, "replicas": int},
    "triggers": [{"type": {"prometheus", "cpu", "memory", "cron", "kafka", "external"}, "name": str,
                  "metricType": {"AverageValue", "Value", "Utilization"}, "useCachedMetrics": bool,
                  "authenticationRef": {"name": str, "kind": str}, "metadata": ANY}],
}
OUTLIER = {"consecutive5xxErrors": int, "consecutiveGatewayErrors": int, "consecutiveLocalOriginFailures": int,
           "splitExternalLocalOriginErrors": bool, "interval": DURATION, "baseEjectionTime": DURATION,
           "maxEjectionPercent": int, "minHealthPercent": int, "consecutiveErrors": int}
DESTINATION_RULE = {
    "host": str, "exportTo": [str], "workloadSelector": ANY, "subsets": ANY,
    "trafficPolicy": {
        "loadBalancer": {"simple": {"UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN",
                                    "LEAST_REQUEST"}, "consistentHash": ANY, "localityLbSetting": ANY,
                         "warmupDurationSecs": DURATION},
        "connectionPool": {"tcp": {"maxConnections": int, "connectTimeout": DURATION, "tcpKeepalive": ANY,
                                   "maxConnectionDuration": DURATION, "idleTimeout": DURATION},
                           "http": {"http1MaxPendingRequests": int, "http2MaxRequests": int,
                                    "maxRequestsPerConnection": int, "maxRetries": int, "idleTimeout": DURATION,
                                    "h2UpgradePolicy": {"DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"},
                                    "useClientProtocol": bool, "maxConcurrentStreams": int}},
        "outlierDetection": OUTLIER, "tls": ANY, "portLevelSettings": ANY, "tunnel": ANY, "proxyProtocol": ANY,
    },
}
RETRY_ON = {"5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited", "retriable-4xx",
            "refused-stream", "retriable-status-codes", "retriable-headers", "cancelled", "deadline-exceeded",
            "internal", "resource-exhausted", "unavailable"}
MATCH = {"name": str, "uri": ANY, "scheme": ANY, "method": ANY, "authority": ANY, "headers": ANY, "port": int,
         "sourceLabels": ANY, "gateways": [str], "queryParams": ANY, "ignoreUriCase": bool,
         "withoutHeaders": ANY, "sourceNamespace": str, "statPrefix": str}
VIRTUAL_SERVICE = {
    "hosts": [str], "gateways": [str], "exportTo": [str], "tcp": ANY, "tls": ANY,
    "http": [{"name": str, "match": [MATCH],
              "route": [{"destination": {"host": str, "subset": str, "port": {"number": int}}, "weight": int,
                         "headers": ANY}],
              "timeout": DURATION,
              "retries": {"attempts": int, "perTryTimeout": DURATION, "retryOn": str, "retryRemoteLocalities": bool},
              "rewrite": ANY, "redirect": ANY, "fault": ANY, "mirror": ANY, "corsPolicy": ANY, "headers": ANY,
              "delegate": ANY, "directResponse": ANY, "mirrorPercentage": ANY, "mirrors": ANY}],
}
PEER_AUTHENTICATION = {
    "selector": {"matchLabels": ANY},
    "mtls": {"mode": {"UNSET", "DISABLE", "PERMISSIVE", "STRICT"}},
    "portLevelMtls": ANY,
}
AUTHORIZATION_POLICY = {
    "selector": {"matchLabels": ANY}, "targetRef": ANY, "targetRefs": ANY, "provider": ANY,
    "action": {"ALLOW", "DENY", "AUDIT", "CUSTOM"},
    "rules": [{"from": [{"source": {"principals": [str], "notPrincipals": [str], "requestPrincipals": [str],
                                    "notRequestPrincipals": [str], "namespaces": [str], "notNamespaces": [str],
                                    "ipBlocks": [str], "notIpBlocks": [str], "remoteIpBlocks": [str],
                                    "notRemoteIpBlocks": [str]}}],
               "to": [{"operation": {"hosts": [str], "notHosts": [str], "ports": [str], "notPorts": [str],
                                     "methods": [str], "notMethods": [str], "paths": [str], "notPaths": [str]}}],
               "when": ANY}],
}
POD_MONITOR = {
    "selector": {"matchLabels": ANY, "matchExpressions": ANY},
    "namespaceSelector": ANY, "jobLabel": str, "podTargetLabels": [str], "sampleLimit": int,
    "podMetricsEndpoints": [{"port": str, "portNumber": int, "path": str, "interval": DURATION,
                             "scrapeTimeout": DURATION, "scheme": {"http", "https"}, "honorLabels": bool,
                             "relabelings": ANY, "metricRelabelings": ANY, "params": ANY, "tlsConfig": ANY}],
}
PROMETHEUS_RULE = {
    "groups": [{"name": str, "interval": DURATION, "limit": int,
                "rules": [{"record": str, "alert": str, "expr": str, "for": DURATION, "keep_firing_for": DURATION,
                           "labels": ANY, "annotations": ANY}]}],
}
KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): (SCALED_OBJECT, ["scaleTargetRef", "triggers"]),
    ("networking.istio.io/v1", "DestinationRule"): (DESTINATION_RULE, ["host"]),
    ("networking.istio.io/v1", "VirtualService"): (VIRTUAL_SERVICE, ["hosts"]),
    ("security.istio.io/v1", "PeerAuthentication"): (PEER_AUTHENTICATION, []),
    ("security.istio.io/v1", "AuthorizationPolicy"): (AUTHORIZATION_POLICY, []),
    ("monitoring.coreos.com/v1", "PodMonitor"): (POD_MONITOR, ["selector", "podMetricsEndpoints"]),
    ("monitoring.coreos.com/v1", "PrometheusRule"): (PROMETHEUS_RULE, ["groups"]),
}
CRD_GROUPS = ("keda.sh", "networking.istio.io", "security.istio.io", "monitoring.coreos.com")


def check(value, schema, path, problems):
    if schema is ANY:
        return
    if schema is DURATION:
        if duration_ms(value) is None:
            problems.append(f"{path}: {value!r} is not a duration like 10s")
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {value!r}")
            return
        for k, v in value.items():
            if k not in schema:
                problems.append(f"{path}.{k}: unknown field")
            else:
                check(v, schema[k], f"{path}.{k}", problems)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return
        for i, item in enumerate(value):
            check(item, schema[0], f"{path}[{i}]", problems)
    elif isinstance(schema, set):
        if value not in schema:
            problems.append(f"{path}: {value!r} is not one of {sorted(schema)}")
    elif schema is int:
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{path}: expected an integer, got {value!r}")
    elif not isinstance(value, schema):
        problems.append(f"{path}: expected {schema.__name__}, got {value!r}")


def rules(doc, where, problems):
    kind, spec = doc["kind"], doc.get("spec") or {}
    if kind == "ScaledObject":
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if lo > hi:
            problems.append(f"{where}: minReplicaCount {lo} above maxReplicaCount {hi}")
        for i, t in enumerate(spec.get("triggers", [])):
            md = t.get("metadata") or {}
            if t.get("type") == "prometheus":
                for key in ("serverAddress", "query", "threshold"):
                    if key not in md:
                        problems.append(f"{where}.spec.triggers[{i}].metadata.{key}: required for prometheus")
                try:
                    float(md.get("threshold", ""))
                except ValueError:
                    problems.append(f"{where}.spec.triggers[{i}].metadata.threshold: not a number")
            if t.get("metricType") == "Utilization" and t.get("type") not in ("cpu", "memory"):
                problems.append(f"{where}.spec.triggers[{i}].metricType: Utilization is only for cpu and memory")
    if kind == "DestinationRule":
        od = (spec.get("trafficPolicy") or {}).get("outlierDetection") or {}
        if "consecutiveLocalOriginFailures" in od and not od.get("splitExternalLocalOriginErrors"):
            problems.append(f"{where}: consecutiveLocalOriginFailures has no effect without "
                            "splitExternalLocalOriginErrors: true")
    if kind == "VirtualService":
        for i, h in enumerate(spec.get("http", [])):
            for key in ("timeout",):
                if key in h and (duration_ms(h[key]) or 0) < 1:
                    problems.append(f"{where}.spec.http[{i}].timeout: Istio rejects timeouts below 1ms; omit it "
                                    "to disable the timeout")
            retry_on = (h.get("retries") or {}).get("retryOn", "")
            for cond in filter(None, retry_on.split(",")):
                if cond not in RETRY_ON:
                    problems.append(f"{where}.spec.http[{i}].retries.retryOn: unknown condition {cond!r}")
            if not h.get("route"):
                problems.append(f"{where}.spec.http[{i}]: a route is required")
    if kind == "AuthorizationPolicy":
        for i, r in enumerate(spec.get("rules", [])):
            for j, to in enumerate(r.get("to", [])):
                for p in (to.get("operation") or {}).get("paths", []):
                    if not p.startswith("/"):
                        problems.append(f"{where}.spec.rules[{i}].to[{j}]: path {p!r} must start with /")
    if kind == "PrometheusRule":
        for g, group in enumerate(spec.get("groups", [])):
            for r, rule in enumerate(group.get("rules", [])):
                at = f"{where}.spec.groups[{g}].rules[{r}]"
                if ("record" in rule) == ("alert" in rule):
                    problems.append(f"{at}: exactly one of record and alert")
                if "expr" not in rule:
                    problems.append(f"{at}: expr is required")
                if "record" in rule and ("annotations" in rule or "for" in rule):
                    problems.append(f"{at}: annotations and for are only valid for alerting rules")


def main():
    problems, seen = [], 0
    for path in sys.argv[1:]:
        for n, doc in enumerate(yaml.safe_load_all(open(path))):
            if not doc:
                continue
            api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            where = f"{path}#{n} {kind} {doc.get('metadata', {}).get('name', '?')}"
            if (api, kind) not in KINDS:
                if api.split("/")[0] in CRD_GROUPS:
                    problems.append(f"{where}: {api} {kind} is not a version and kind this check knows")
                continue
            seen += 1
            schema, required = KINDS[(api, kind)]
            if not (doc.get("metadata") or {}).get("name"):
                problems.append(f"{where}: metadata.name is required")
            spec = doc.get("spec")
            if spec is None:
                problems.append(f"{where}: spec is required")
                continue
            for key in required:
                if key not in spec:
                    problems.append(f"{where}.spec.{key}: required")
            check(spec, schema, f"{where}.spec", problems)
            rules(doc, where, problems)
    for p in problems:
        print(f"[check-crds] {p}", file=sys.stderr)
    print(f"[check-crds] {seen} custom resources checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
