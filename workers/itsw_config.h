/* itsw_config.h — the configuration of `itsw serve`: an INI file (section [worker]) read with
 * inih, then command-line flags that override it. One table in itsw_config.c drives parsing,
 * defaults, validation and the --help text; configs/itsw-<role>.conf documents every key.
 */
#ifndef ITS_ITSW_CONFIG_H
#define ITS_ITSW_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

struct itsw_config {
    char *connect;     /* itsd's backend endpoint */
    enum proto_role role;
    char *model_dir;   /* Hugging Face model directory, or "random:SHAPE" (ITSW_RANDOM_PREFIX) */
    char *model_name;  /* announced to itsd; default: the directory's last component */
    char *tokenizer_dir; /* tokenizer.json + tokenizer_config.json; "" = model_dir */
    int random_seed;   /* seed of the random weights of a random: model */
    bool ignore_eos;   /* every generate runs to its max_tokens (benchmarks) */
    char *backend;     /* cpu | cuda */
    int device;        /* cuda device ordinal */
    char *chat_format; /* auto | llama3 | llama31 | nemotron-super | plain */
    char *name;        /* worker id; default ROLE-HOST-PID */
    int threads;       /* cpu threads, 0 = all cores */
    int max_seqs;      /* concurrent sequences, 0 = engine default */
    int kv_tokens;     /* KV cache positions, 0 = engine default */
    int max_batch_tokens; /* tokens per engine step, 0 = engine default */
    int heartbeat_ms;  /* heartbeat interval both ways */
    int liveness;      /* intervals of silence from itsd before reconnecting */
    int log_level;     /* 0 error, 1 warn, 2 info, 3 debug */
    char *server_key;  /* file with itsd's CURVE public key; "" = plain text */
    char *key;         /* this worker's key pair file (itsctl keygen); "" = plain text */
    /* from the two files above, when both are set (docs/security.md) */
    bool curve;
    uint8_t curve_server[32], curve_public[32], curve_secret[32];
    /* derived: for model = random:SHAPE, SHAPE (points into model_dir; a name that
     * model_shape_by_name knows, checked here); NULL for a model directory */
    const char *random_shape;
};

/* `model = random:SHAPE` serves random weights of a named shape (model_shape_by_name) with the
 * tokenizer of `tokenizer`, instead of a checkpoint: for benchmarks and load tests. */
#define ITSW_RANDOM_PREFIX "random:"

/* Fills *c from `--config FILE` (if given) and then the flags in argv (argv[0] is the verb).
 * Returns 0, 1 when --help was asked (nothing else done), or -1 with err holding every
 * problem found, each as "FILE:LINE: key: reason" or "--flag: reason", separated by "; ".
 * The CURVE key files (server_key, key) are read here too, so a bad one stops the worker
 * before it loads a model. A random: model's shape name is checked here, and a tokenizer
 * directory is then required.
 * *c must be released with itsw_config_deinit in every case. */
int itsw_config_from_args(int argc, char **argv, struct itsw_config *c, char *err,
                          size_t err_len);

/* Frees the strings of *c; safe on a zeroed or half-filled config. */
void itsw_config_deinit(struct itsw_config *c);

/* The help text of `itsw serve`, listing every option with its default. */
const char *itsw_config_usage(void);

#endif
