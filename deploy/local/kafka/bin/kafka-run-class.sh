#!/usr/bin/env bash
# Kafka's kafka-run-class.sh reduced to what this image needs: a main class on Kafka's jars.
# Tools start with the C1 compiler and the serial GC (the compose healthcheck runs one every 5 s);
# KAFKA_JVM_PERFORMANCE_OPTS overrides that.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "USAGE: $0 classname [opts]" >&2
  exit 1
fi
home=/opt/kafka
exec java ${KAFKA_HEAP_OPTS:--Xmx256M} \
  ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true} \
  ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$home/config/tools-log4j2.xml} \
  ${KAFKA_OPTS:-} \
  -cp "$home/libs/*" "$@"
