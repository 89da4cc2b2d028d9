# syntax=docker/dockerfile:1
# The MLflow tracking server image used by infra/mlflow/mlflow.yaml: the same MLflow version as the
# training clients (the pin in pyproject.toml) with its auth extra (the basic-auth app), plus the
# PostgreSQL driver (backend store) and boto3 (the S3 artifact store behind --serve-artifacts).
# Nothing is copied from the repository:
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/irg-project/irg-mlflow:3.17.2 infra/docker
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" boto3==1.44.5 psycopg2-binary==2.9.13 \
 && useradd --create-home --uid 1000 mlflow

USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
