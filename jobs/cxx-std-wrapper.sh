#!/usr/bin/env bash
# Compiler wrapper for building Horovod 0.28.1 against current PyTorch: Horovod's CMake hard-codes an
# old C++ standard (-std=c++11/14) that torch's headers no longer compile with. Every such flag is
# rewritten to $HPCNOISE_CXX_STD (c++17 or c++20); all other arguments pass through unchanged.
set -euo pipefail
args=()
for a in "$@"; do
  case "$a" in
    -std=c++11|-std=c++14|-std=c++17|-std=gnu++11|-std=gnu++14|-std=gnu++17) args+=("-std=${HPCNOISE_CXX_STD:-c++17}") ;;
    *) args+=("$a") ;;
  esac
done
exec "${HPCNOISE_REAL_CXX:-g++}" "${args[@]}"
