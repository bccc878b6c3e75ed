/* proto_schema.c — the field tables of every protocol message (see proto_schema.h).
 *
 * This file is the single place where a field's wire name, presence, range and limit are
 * written down; docs/protocol.md must agree with it (tests/test_proto_doc.c checks). Constant
 * data and pure lookups only: no allocation, no mutable state.
 */
#include "proto_schema.h"

#include <float.h>
#include <stdio.h>
#include <string.h>

/* ---- enums ---------------------------------------------------------------------------- */

static const char *const proto_schema_chat_role_names[] = { "system", "user", "assistant" };
static const char *const proto_schema_role_names[] = { "instruct", "feedback", "edit", "select" };
static const char *const proto_schema_finish_names[] = { "stop", "length", "cancelled" };
static const char *const proto_schema_state_names[] = { "ready", "busy", "draining", "lost" };
/* In enum proto_err order, starting at -1. */
static const char *const proto_schema_err_names[] = {
    "bad_message", "bad_version", "bad_field", "too_large", "no_memory", "busy", "not_found",
    "no_worker", "deadline", "cancelled", "unauthorized", "shutting_down", "worker_lost",
    "internal",
};
_Static_assert(sizeof proto_schema_err_names / sizeof *proto_schema_err_names ==
                   PROTO_ERR_COUNT, "one name per error code");
_Static_assert(-PROTO_ERR_COUNT == PROTO_ERR_INTERNAL, "PROTO_ERR_COUNT is the last code");
_Static_assert(sizeof(enum proto_err) == sizeof(int) && sizeof(enum proto_role) == sizeof(int) &&
                   sizeof(enum proto_chat_role) == sizeof(int) &&
                   sizeof(enum proto_finish) == sizeof(int) &&
                   sizeof(enum proto_worker_state) == sizeof(int),
               "the codec stores enums as int");

#define PROTO_SCHEMA_ENUM_OF(arr, first_, step_) \
    { .names = arr, .n_names = (int)(sizeof arr / sizeof *arr), .first = first_, .step = step_ }

static const struct proto_schema_enum proto_schema_enums[] = {
    [PROTO_SCHEMA_EN_CHAT_ROLE] = PROTO_SCHEMA_ENUM_OF(proto_schema_chat_role_names, 0, 1),
    [PROTO_SCHEMA_EN_ROLE] = PROTO_SCHEMA_ENUM_OF(proto_schema_role_names, 0, 1),
    [PROTO_SCHEMA_EN_FINISH] = PROTO_SCHEMA_ENUM_OF(proto_schema_finish_names, 0, 1),
    [PROTO_SCHEMA_EN_WORKER_STATE] = PROTO_SCHEMA_ENUM_OF(proto_schema_state_names, 0, 1),
    [PROTO_SCHEMA_EN_ERR] = PROTO_SCHEMA_ENUM_OF(proto_schema_err_names, -1, -1),
};

const struct proto_schema_enum *proto_schema_enum_get(enum proto_schema_enum_id id)
{
    if ((unsigned)id >= sizeof proto_schema_enums / sizeof *proto_schema_enums)
        return NULL;
    return &proto_schema_enums[id];
}

const char *proto_schema_enum_name(const struct proto_schema_enum *e, int value)
{
    long i = ((long)value - e->first) / e->step;
    if (((long)value - e->first) % e->step != 0 || i < 0 || i >= e->n_names)
        return NULL;
    return e->names[i];
}

int proto_schema_enum_value(const struct proto_schema_enum *e, const char *s, size_t len,
                            int *out)
{
    for (int i = 0; i < e->n_names; i++) {
        if (strlen(e->names[i]) == len && memcmp(e->names[i], s, len) == 0) {
            *out = e->first + i * e->step;
            return 0;
        }
    }
    return -1;
}

/* ---- field constructors -----------------------------------------------------------------
 * Presence (C member `f` of struct `st`; the wire key is the member's name):            */
#define REQ(st, f) .name = #f, .presence = PROTO_SCHEMA_REQUIRED, .off = offsetof(st, f)
#define OPT(st, f) .name = #f, .presence = PROTO_SCHEMA_OPTIONAL, .off = offsetof(st, f), \
                   .has_off = offsetof(st, has_##f)
#define OPT_STR(st, f) .name = #f, .presence = PROTO_SCHEMA_OPTIONAL, .off = offsetof(st, f)
#define NULLABLE(st, f) .name = #f, .presence = PROTO_SCHEMA_NULLABLE, .off = offsetof(st, f), \
                        .has_off = offsetof(st, has_##f)
#define NULLABLE_STR(st, f) .name = #f, .presence = PROTO_SCHEMA_NULLABLE, .off = offsetof(st, f)
/* Kinds; `lim` is a limit macro from proto.h, named in too_large errors: */
#define BOOL_ .kind = PROTO_SCHEMA_BOOL
#define U32(lo_, lim) .kind = PROTO_SCHEMA_U32, .lo = (lo_), .hi = (lim), .hi_name = #lim
#define U32_RANGE(lo_, hi_) .kind = PROTO_SCHEMA_U32, .lo = (lo_), .hi = (hi_)
#define U32_ANY U32_RANGE(0, UINT32_MAX)
#define U64_RANGE(lo_, hi_) .kind = PROTO_SCHEMA_U64, .lo = (lo_), .hi = (hi_)
#define U64_ANY U64_RANGE(0, UINT64_MAX)
#define F64(flo_, fhi_) .kind = PROTO_SCHEMA_F64, .flo = (flo_), .fhi = (fhi_)
#define F64_ANY F64(-DBL_MAX, DBL_MAX)
#define STR(lo_, lim) .kind = PROTO_SCHEMA_STR, .lo = (lo_), .hi = (lim), .hi_name = #lim
#define ENUM(id) .kind = PROTO_SCHEMA_ENUM, .en = &proto_schema_enums[id]
#define MAP(o) .kind = PROTO_SCHEMA_MAP, .obj = &(o)
#define ARRAY(st, f, lo_, lim, el, el_size) .kind = PROTO_SCHEMA_ARRAY, \
    .count_off = offsetof(st, n_##f), .lo = (lo_), .hi = (lim), .hi_name = #lim, \
    .elem = &(el), .elem_size = (el_size)
#define OBJ(name_, st, fields_, check_) { .name = name_, .fields = fields_, \
    .n_fields = sizeof fields_ / sizeof *fields_, .size = sizeof(st), .check = check_ }

/* ---- shared pieces -------------------------------------------------------------------- */

#define CM struct proto_chat_msg
static const struct proto_schema_field proto_schema_chat_msg_fields[] = {
    { REQ(CM, role), ENUM(PROTO_SCHEMA_EN_CHAT_ROLE) },
    { REQ(CM, content), STR(0, PROTO_MAX_STRING_BYTES) },
};
#undef CM
static const struct proto_schema_obj proto_schema_chat_msg =
    OBJ("chat_msg", struct proto_chat_msg, proto_schema_chat_msg_fields, NULL);
static const struct proto_schema_field proto_schema_chat_msg_elem = {
    MAP(proto_schema_chat_msg),
};

#define SO struct proto_sampling_opt
static const struct proto_schema_field proto_schema_sampling_opt_fields[] = {
    { OPT(SO, temperature), F64(0.0, PROTO_MAX_TEMPERATURE) },
    { OPT(SO, top_p), F64(0.0, 1.0), .flo_open = true },
    { OPT(SO, max_tokens), U32(1, PROTO_MAX_TOKENS) },
};
#undef SO
static const struct proto_schema_obj proto_schema_sampling_opt =
    OBJ("sampling_opt", struct proto_sampling_opt, proto_schema_sampling_opt_fields, NULL);

#define SS struct proto_submit_sampling
static const struct proto_schema_field proto_schema_submit_sampling_fields[] = {
    { OPT(SS, instruct), MAP(proto_schema_sampling_opt) },
    { OPT(SS, feedback), MAP(proto_schema_sampling_opt) },
    { OPT(SS, edit), MAP(proto_schema_sampling_opt) },
};
#undef SS
static const struct proto_schema_obj proto_schema_submit_sampling =
    OBJ("submit_sampling", struct proto_submit_sampling, proto_schema_submit_sampling_fields,
        NULL);

#define CP struct proto_capacity
static const struct proto_schema_field proto_schema_capacity_fields[] = {
    { REQ(CP, max_seqs), U32(1, PROTO_MAX_SEQS) },
    { REQ(CP, max_ctx), U32(1, PROTO_MAX_CONTEXT) },
    { REQ(CP, kv_tokens), U64_RANGE(1, UINT64_MAX) },
};
#undef CP
static const struct proto_schema_obj proto_schema_capacity =
    OBJ("capacity", struct proto_capacity, proto_schema_capacity_fields, NULL);

#define LD struct proto_load
static const struct proto_schema_field proto_schema_load_fields[] = {
    { REQ(LD, running), U32_ANY },
    { REQ(LD, queued), U32_ANY },
    { REQ(LD, kv_used), U64_ANY },
};
#undef LD
static const struct proto_schema_obj proto_schema_load =
    OBJ("load", struct proto_load, proto_schema_load_fields, NULL);

#define US struct proto_usage
static const struct proto_schema_field proto_schema_usage_fields[] = {
    { REQ(US, prompt_tokens), U64_ANY },
    { REQ(US, completion_tokens), U64_ANY },
};
#undef US
static const struct proto_schema_obj proto_schema_usage =
    OBJ("usage", struct proto_usage, proto_schema_usage_fields, NULL);

/* ---- client <-> itsd ------------------------------------------------------------------ */

#define SU struct proto_submit
static const struct proto_schema_field proto_schema_submit_fields[] = {
    { REQ(SU, tag), U64_ANY },
    { REQ(SU, messages), ARRAY(SU, messages, 1, PROTO_MAX_MESSAGES, proto_schema_chat_msg_elem,
                               sizeof(struct proto_chat_msg)) },
    { OPT(SU, drafts), U32(1, PROTO_MAX_DRAFTS) },
    { OPT(SU, feedbacks), U32(0, PROTO_MAX_FEEDBACKS) },
    { OPT(SU, edits), U32(0, PROTO_MAX_EDITS) },
    { OPT(SU, feedbacks_per_edit), U32(1, PROTO_MAX_FEEDBACKS_PER_EDIT) },
    { OPT(SU, sampling), MAP(proto_schema_submit_sampling) },
    { OPT(SU, include_drafts), BOOL_ },
    { OPT(SU, deadline_ms), U32(1, PROTO_MAX_DEADLINE_MS) },
    { OPT(SU, progress), BOOL_ },
    { OPT(SU, seed), U64_ANY },
};
#undef SU

static const struct proto_schema_field proto_schema_accepted_fields[] = {
    { REQ(struct proto_accepted, tag), U64_ANY },
    { REQ(struct proto_accepted, id), STR(1, PROTO_MAX_ID_BYTES) },
};

static const struct proto_schema_field proto_schema_cancel_fields[] = {
    { REQ(struct proto_cancel, id), STR(1, PROTO_MAX_ID_BYTES) },
};

static const struct proto_schema_field proto_schema_get_fields[] = {
    { REQ(struct proto_get, id), STR(1, PROTO_MAX_ID_BYTES) },
};

static const struct proto_schema_field proto_schema_status_fields[] = {
    { OPT(struct proto_status, tag), U64_ANY },
    { OPT(struct proto_status, metrics), BOOL_ },
};

#define RC struct proto_role_counts
static const struct proto_schema_field proto_schema_role_counts_fields[] = {
    { REQ(RC, instruct), U32_ANY },
    { REQ(RC, feedback), U32_ANY },
    { REQ(RC, edit), U32_ANY },
    { REQ(RC, select), U32_ANY },
};
#undef RC
static const struct proto_schema_obj proto_schema_role_counts =
    OBJ("role_counts", struct proto_role_counts, proto_schema_role_counts_fields, NULL);

#define WI struct proto_worker_info
static const struct proto_schema_field proto_schema_worker_info_fields[] = {
    { REQ(WI, id), STR(1, PROTO_MAX_NAME_BYTES) },
    { REQ(WI, role), ENUM(PROTO_SCHEMA_EN_ROLE) },
    { REQ(WI, model), STR(1, PROTO_MAX_NAME_BYTES) },
    { REQ(WI, backend), STR(1, PROTO_MAX_NAME_BYTES) },
    { REQ(WI, state), ENUM(PROTO_SCHEMA_EN_WORKER_STATE) },
    { REQ(WI, capacity), MAP(proto_schema_capacity) },
    { REQ(WI, jobs), U32_ANY },
    { OPT(WI, load), MAP(proto_schema_load) },
};
#undef WI
static const struct proto_schema_obj proto_schema_worker_info =
    OBJ("worker_info", struct proto_worker_info, proto_schema_worker_info_fields, NULL);
static const struct proto_schema_field proto_schema_worker_info_elem = {
    MAP(proto_schema_worker_info),
};

#define RQ struct proto_request_counts
static const struct proto_schema_field proto_schema_request_counts_fields[] = {
    { REQ(RQ, ok), U64_ANY },
    { REQ(RQ, partial), U64_ANY },
    { REQ(RQ, cancelled), U64_ANY },
    { REQ(RQ, deadline), U64_ANY },
    { REQ(RQ, failed), U64_ANY },
    { REQ(RQ, rejected), U64_ANY },
};
#undef RQ
static const struct proto_schema_obj proto_schema_request_counts =
    OBJ("request_counts", struct proto_request_counts, proto_schema_request_counts_fields, NULL);

#define LA struct proto_latency
static const struct proto_schema_field proto_schema_latency_fields[] = {
    { REQ(LA, count), U64_ANY },
    { REQ(LA, sum_s), F64(0.0, DBL_MAX) },
    { OPT(LA, p50_s), F64(0.0, DBL_MAX) },
    { OPT(LA, p95_s), F64(0.0, DBL_MAX) },
};
#undef LA
static const struct proto_schema_obj proto_schema_latency =
    OBJ("latency", struct proto_latency, proto_schema_latency_fields, NULL);

#define RT struct proto_role_totals
static const struct proto_schema_field proto_schema_role_totals_fields[] = {
    { REQ(RT, instruct), U64_ANY },
    { REQ(RT, feedback), U64_ANY },
    { REQ(RT, edit), U64_ANY },
    { REQ(RT, select), U64_ANY },
};
#undef RT
static const struct proto_schema_obj proto_schema_role_totals =
    OBJ("role_totals", struct proto_role_totals, proto_schema_role_totals_fields, NULL);

#define SK struct proto_socket_counts
static const struct proto_schema_field proto_schema_socket_counts_fields[] = {
    { REQ(SK, frontend), U64_ANY },
    { REQ(SK, backend), U64_ANY },
};
#undef SK
static const struct proto_schema_obj proto_schema_socket_counts =
    OBJ("socket_counts", struct proto_socket_counts, proto_schema_socket_counts_fields, NULL);

#define ME struct proto_metrics
static const struct proto_schema_field proto_schema_metrics_fields[] = {
    { REQ(ME, requests), MAP(proto_schema_request_counts) },
    { REQ(ME, latency), MAP(proto_schema_latency) },
    { REQ(ME, queue_depth), MAP(proto_schema_role_counts) },
    { REQ(ME, jobs_in_flight), MAP(proto_schema_role_counts) },
    { REQ(ME, tokens_generated), MAP(proto_schema_role_totals) },
    { REQ(ME, heartbeat_misses), U64_ANY },
    { REQ(ME, job_retries), U64_ANY },
    { REQ(ME, protocol_errors), MAP(proto_schema_socket_counts) },
};
#undef ME
static const struct proto_schema_obj proto_schema_metrics =
    OBJ("metrics", struct proto_metrics, proto_schema_metrics_fields, NULL);

#define SR struct proto_status_reply
static const struct proto_schema_field proto_schema_status_reply_fields[] = {
    { OPT(SR, tag), U64_ANY },
    { REQ(SR, roles), MAP(proto_schema_role_counts) },
    { REQ(SR, queue_depth), U32_ANY },
    { REQ(SR, in_flight), U32_ANY },
    { REQ(SR, workers), ARRAY(SR, workers, 0, PROTO_MAX_WORKERS, proto_schema_worker_info_elem,
                              sizeof(struct proto_worker_info)) },
    { OPT(SR, metrics), MAP(proto_schema_metrics) },
};
#undef SR

static int proto_schema_check_stage(const void *obj, const char **field, char *msg,
                                    size_t msg_len)
{
    const struct proto_stage *s = obj;
    if (s->done > s->total) {
        *field = "done";
        snprintf(msg, msg_len, "%u exceeds total %u", s->done, s->total);
        return PROTO_ERR_BAD_FIELD;
    }
    return 0;
}

static const struct proto_schema_field proto_schema_stage_fields[] = {
    { REQ(struct proto_stage, done), U32_ANY },
    { REQ(struct proto_stage, total), U32_ANY },
};
static const struct proto_schema_obj proto_schema_stage =
    OBJ("stage", struct proto_stage, proto_schema_stage_fields, proto_schema_check_stage);

#define PR struct proto_progress
static const struct proto_schema_field proto_schema_progress_fields[] = {
    { REQ(PR, id), STR(1, PROTO_MAX_ID_BYTES) },
    { REQ(PR, drafts), MAP(proto_schema_stage) },
    { REQ(PR, feedbacks), MAP(proto_schema_stage) },
    { REQ(PR, edits), MAP(proto_schema_stage) },
    { REQ(PR, scores), MAP(proto_schema_stage) },
    { REQ(PR, elapsed_ms), U64_ANY },
};
#undef PR

static const struct proto_schema_field proto_schema_text_elem = {
    STR(0, PROTO_MAX_STRING_BYTES),
};

#define CA struct proto_candidate
static const struct proto_schema_field proto_schema_candidate_fields[] = {
    { REQ(CA, draft_index), U32_RANGE(0, PROTO_MAX_DRAFTS - 1) },
    { REQ(CA, draft), STR(0, PROTO_MAX_STRING_BYTES) },
    { REQ(CA, feedbacks), ARRAY(CA, feedbacks, 0, PROTO_MAX_FEEDBACKS, proto_schema_text_elem,
                                sizeof(char *)) },
    { NULLABLE_STR(CA, edit), STR(0, PROTO_MAX_STRING_BYTES) },
    { NULLABLE(CA, score), F64_ANY },
};
#undef CA
static const struct proto_schema_obj proto_schema_candidate =
    OBJ("candidate", struct proto_candidate, proto_schema_candidate_fields, NULL);
static const struct proto_schema_field proto_schema_candidate_elem = {
    MAP(proto_schema_candidate),
};

#define TI struct proto_timings
static const struct proto_schema_field proto_schema_timings_fields[] = {
    { REQ(TI, drafts_ms), U64_ANY },
    { REQ(TI, feedbacks_ms), U64_ANY },
    { REQ(TI, edits_ms), U64_ANY },
    { REQ(TI, scores_ms), U64_ANY },
    { REQ(TI, total_ms), U64_ANY },
};
#undef TI
static const struct proto_schema_obj proto_schema_timings =
    OBJ("timings", struct proto_timings, proto_schema_timings_fields, NULL);

#define RU struct proto_role_usage
static const struct proto_schema_field proto_schema_role_usage_fields[] = {
    { REQ(RU, instruct), MAP(proto_schema_usage) },
    { REQ(RU, feedback), MAP(proto_schema_usage) },
    { REQ(RU, edit), MAP(proto_schema_usage) },
    { REQ(RU, select), MAP(proto_schema_usage) },
};
#undef RU
static const struct proto_schema_obj proto_schema_role_usage =
    OBJ("role_usage", struct proto_role_usage, proto_schema_role_usage_fields, NULL);

static int proto_schema_check_result(const void *obj, const char **field, char *msg,
                                     size_t msg_len)
{
    const struct proto_result *r = obj;
    if (r->has_best && r->best >= r->n_candidates) {
        *field = "best";
        snprintf(msg, msg_len, "%u is not a candidate index (%u candidates)", r->best,
                 r->n_candidates);
        return PROTO_ERR_BAD_FIELD;
    }
    return 0;
}

#define RE struct proto_result
static const struct proto_schema_field proto_schema_result_fields[] = {
    { REQ(RE, id), STR(1, PROTO_MAX_ID_BYTES) },
    { REQ(RE, answer), STR(0, PROTO_MAX_STRING_BYTES) },
    { NULLABLE(RE, score), F64_ANY },
    { NULLABLE(RE, best), U32_RANGE(0, PROTO_MAX_CANDIDATES - 1) },
    { REQ(RE, partial), BOOL_ },
    { REQ(RE, candidates), ARRAY(RE, candidates, 0, PROTO_MAX_CANDIDATES,
                                 proto_schema_candidate_elem, sizeof(struct proto_candidate)) },
    { REQ(RE, timings), MAP(proto_schema_timings) },
    { REQ(RE, usage), MAP(proto_schema_role_usage) },
};
#undef RE

#define ER struct proto_error
static const struct proto_schema_field proto_schema_error_fields[] = {
    { OPT(ER, tag), U64_ANY },
    { OPT_STR(ER, id), STR(1, PROTO_MAX_ID_BYTES) },
    { REQ(ER, code), ENUM(PROTO_SCHEMA_EN_ERR) },
    { REQ(ER, message), STR(0, PROTO_MAX_ERROR_BYTES) },
};
#undef ER

/* ---- itsd <-> itsw -------------------------------------------------------------------- */

#define RD struct proto_ready
static const struct proto_schema_field proto_schema_ready_fields[] = {
    { REQ(RD, worker), STR(1, PROTO_MAX_NAME_BYTES) },
    { REQ(RD, role), ENUM(PROTO_SCHEMA_EN_ROLE) },
    { REQ(RD, model), STR(1, PROTO_MAX_NAME_BYTES) },
    { REQ(RD, backend), STR(1, PROTO_MAX_NAME_BYTES) },
    { REQ(RD, capacity), MAP(proto_schema_capacity) },
};
#undef RD

static const struct proto_schema_field proto_schema_heartbeat_fields[] = {
    { OPT(struct proto_heartbeat, load), MAP(proto_schema_load) },
};

static const struct proto_schema_field proto_schema_disconnect_fields[] = {
    { REQ(struct proto_disconnect, reason), STR(0, PROTO_MAX_ERROR_BYTES) },
};

#define SA struct proto_sampling
static const struct proto_schema_field proto_schema_sampling_fields[] = {
    { REQ(SA, temperature), F64(0.0, PROTO_MAX_TEMPERATURE) },
    { REQ(SA, top_p), F64(0.0, 1.0), .flo_open = true },
    { REQ(SA, top_k), U32(0, PROTO_MAX_TOP_K) },
    { REQ(SA, seed), U64_ANY },
    { REQ(SA, max_tokens), U32(1, PROTO_MAX_TOKENS) },
    { REQ(SA, ignore_eos), BOOL_ },
};
#undef SA
static const struct proto_schema_obj proto_schema_sampling =
    OBJ("sampling", struct proto_sampling, proto_schema_sampling_fields, NULL);

#define GE struct proto_generate
static const struct proto_schema_field proto_schema_generate_fields[] = {
    { REQ(GE, job), U64_ANY },
    { REQ(GE, messages), ARRAY(GE, messages, 1, PROTO_MAX_MESSAGES, proto_schema_chat_msg_elem,
                               sizeof(struct proto_chat_msg)) },
    { REQ(GE, add_generation_prompt), BOOL_ },
    { REQ(GE, n), U32(1, PROTO_MAX_SAMPLES) },
    { REQ(GE, sampling), MAP(proto_schema_sampling) },
};
#undef GE

/* A conversation is an array (not a map) of chat messages. */
#define CV struct proto_conversation
static const struct proto_schema_field proto_schema_conversation_elem = {
    .off = offsetof(CV, messages),
    ARRAY(CV, messages, 1, PROTO_MAX_MESSAGES, proto_schema_chat_msg_elem,
          sizeof(struct proto_chat_msg)),
};
#undef CV

#define SC struct proto_score
static const struct proto_schema_field proto_schema_score_fields[] = {
    { REQ(SC, job), U64_ANY },
    { REQ(SC, conversations), ARRAY(SC, conversations, 1, PROTO_MAX_CONVERSATIONS,
                                    proto_schema_conversation_elem,
                                    sizeof(struct proto_conversation)) },
};
#undef SC

static const struct proto_schema_field proto_schema_cancel_job_fields[] = {
    { REQ(struct proto_cancel_job, job), U64_ANY },
};

#define OU struct proto_output
static const struct proto_schema_field proto_schema_output_fields[] = {
    { REQ(OU, text), STR(0, PROTO_MAX_STRING_BYTES) },
    { REQ(OU, n_tokens), U32(0, PROTO_MAX_TOKENS) },
    { REQ(OU, finish), ENUM(PROTO_SCHEMA_EN_FINISH) },
};
#undef OU
static const struct proto_schema_obj proto_schema_output =
    OBJ("output", struct proto_output, proto_schema_output_fields, NULL);
static const struct proto_schema_field proto_schema_output_elem = {
    MAP(proto_schema_output),
};

#define GR struct proto_generate_result
static const struct proto_schema_field proto_schema_generate_result_fields[] = {
    { REQ(GR, job), U64_ANY },
    { REQ(GR, outputs), ARRAY(GR, outputs, 1, PROTO_MAX_SAMPLES, proto_schema_output_elem,
                              sizeof(struct proto_output)) },
    { REQ(GR, usage), MAP(proto_schema_usage) },
};
#undef GR

static const struct proto_schema_field proto_schema_score_elem = { F64_ANY };

#define SRS struct proto_score_result
static const struct proto_schema_field proto_schema_score_result_fields[] = {
    { REQ(SRS, job), U64_ANY },
    { REQ(SRS, scores), ARRAY(SRS, scores, 1, PROTO_MAX_CONVERSATIONS, proto_schema_score_elem,
                              sizeof(double)) },
    { REQ(SRS, usage), MAP(proto_schema_usage) },
};
#undef SRS

#define JE struct proto_job_error
static const struct proto_schema_field proto_schema_job_error_fields[] = {
    { REQ(JE, job), U64_ANY },
    { REQ(JE, code), ENUM(PROTO_SCHEMA_EN_ERR) },
    { REQ(JE, message), STR(0, PROTO_MAX_ERROR_BYTES) },
};
#undef JE

#define SA struct proto_sample
static const struct proto_schema_field proto_schema_sample_fields[] = {
    { REQ(SA, job), U64_ANY },
    { REQ(SA, index), U32_RANGE(0, PROTO_MAX_SAMPLES - 1) }, /* an index, like draft_index */
    { REQ(SA, output), MAP(proto_schema_output) },
};
#undef SA

/* ---- the message table ------------------------------------------------------------------ */

static const struct proto_schema_obj proto_schema_messages[PROTO_TYPE_COUNT] = {
    [PROTO_SUBMIT] = OBJ("submit", struct proto_submit, proto_schema_submit_fields, NULL),
    [PROTO_ACCEPTED] = OBJ("accepted", struct proto_accepted, proto_schema_accepted_fields,
                           NULL),
    [PROTO_CANCEL] = OBJ("cancel", struct proto_cancel, proto_schema_cancel_fields, NULL),
    [PROTO_GET] = OBJ("get", struct proto_get, proto_schema_get_fields, NULL),
    [PROTO_STATUS] = OBJ("status", struct proto_status, proto_schema_status_fields, NULL),
    [PROTO_STATUS_REPLY] = OBJ("status_reply", struct proto_status_reply,
                               proto_schema_status_reply_fields, NULL),
    [PROTO_PROGRESS] = OBJ("progress", struct proto_progress, proto_schema_progress_fields,
                           NULL),
    [PROTO_RESULT] = OBJ("result", struct proto_result, proto_schema_result_fields,
                         proto_schema_check_result),
    [PROTO_ERROR] = OBJ("error", struct proto_error, proto_schema_error_fields, NULL),
    [PROTO_READY] = OBJ("ready", struct proto_ready, proto_schema_ready_fields, NULL),
    [PROTO_HEARTBEAT] = OBJ("heartbeat", struct proto_heartbeat, proto_schema_heartbeat_fields,
                            NULL),
    [PROTO_DISCONNECT] = OBJ("disconnect", struct proto_disconnect,
                             proto_schema_disconnect_fields, NULL),
    [PROTO_GENERATE] = OBJ("generate", struct proto_generate, proto_schema_generate_fields,
                           NULL),
    [PROTO_SCORE] = OBJ("score", struct proto_score, proto_schema_score_fields, NULL),
    [PROTO_CANCEL_JOB] = OBJ("cancel_job", struct proto_cancel_job,
                             proto_schema_cancel_job_fields, NULL),
    [PROTO_GENERATE_RESULT] = OBJ("generate_result", struct proto_generate_result,
                                  proto_schema_generate_result_fields, NULL),
    [PROTO_SCORE_RESULT] = OBJ("score_result", struct proto_score_result,
                               proto_schema_score_result_fields, NULL),
    [PROTO_JOB_ERROR] = OBJ("job_error", struct proto_job_error, proto_schema_job_error_fields,
                            NULL),
    [PROTO_SAMPLE] = OBJ("sample", struct proto_sample, proto_schema_sample_fields, NULL),
};

const struct proto_schema_obj *proto_schema_message(enum proto_type t)
{
    if ((unsigned)t >= PROTO_TYPE_COUNT || t == PROTO_NONE)
        return NULL;
    return &proto_schema_messages[t];
}
