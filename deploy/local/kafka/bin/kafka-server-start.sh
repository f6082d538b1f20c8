#!/usr/bin/env bash
# as the distribution's: kafka-server-start.sh server.properties (the image's entry point uses /etc/kafka/docker/run)
exec java ${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G} \
  ${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true} \
  ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=/opt/kafka/config/log4j2.xml} \
  ${KAFKA_OPTS:-} \
  -cp "/opt/kafka/libs/*" kafka.Kafka "$@"
