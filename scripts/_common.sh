#!/usr/bin/env bash
# Shared helpers for the toolkit's shell scripts: log lines, project root, venv lookup.
# Sourced, never executed. Keep logic in Python; these only translate conventions.

# Project root: the directory that holds this scripts/ folder, whatever the caller's directory.
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PROJECT_ROOT

# project_root: prints PROJECT_ROOT (for scripts that prefer a function to a global).
project_root() { printf '%s\n' "${PROJECT_ROOT}"; }

log_info() { printf '[INFO] %s\n' "$*"; }
log_run() { printf '[RUN ] %s\n' "$*"; }
log_skip() { printf '[SKIP] %s\n' "$*"; }
log_done() { printf '[DONE] %s\n' "$*"; }
log_warn() { printf '[WARN] %s\n' "$*" >&2; }
log_err() { printf '[ERR] %s\n' "$*" >&2; }

# die MESSAGE: one [ERR] line on stderr, exit 1.
die() {
  log_err "$*"
  exit 1
}

# venv_python: the interpreter of the project's virtual environment ($VENV, default .venv),
# or $PYTHON when set (tests and unusual setups).
venv_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s\n' "${PYTHON}"
    return 0
  fi
  local venv="${VENV:-${PROJECT_ROOT}/.venv}"
  [[ "${venv}" = /* ]] || venv="${PROJECT_ROOT}/${venv}"
  if [[ ! -x "${venv}/bin/python" ]]; then
    die "no Python environment at ${venv}: run 'make setup' first"
  fi
  printf '%s\n' "${venv}/bin/python"
}
