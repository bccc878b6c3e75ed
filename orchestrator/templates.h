/* templates.h — the role prompt templates: which messages each role's job gets, read from
 * plain-text files (configs/prompts/<role>.tmpl) so that a user who reads a newer model card
 * fixes a prompt without a rebuild.
 *
 * File format (UTF-8, LF or CRLF line ends):
 *   - Lines starting with '#' before the first section are comments; blank lines there too.
 *   - A section starts with a line holding only its name (trailing blanks allowed):
 *       @conversation   the user's conversation, message by message, as submitted
 *       @system         a system message (only as the first section)
 *       @user           a user message
 *       @assistant      an assistant message
 *     The lines after @system/@user/@assistant, up to the next section line, are that
 *     message's text; blank lines around it are dropped. @conversation takes no text.
 *   - In text, a line starting "@@" stands for one starting "@" (so a message may begin with
 *     '@'), and "{{" stands for "{". '#' has no meaning inside a section.
 *   - Placeholders in text: {prompt} (the conversation's last user message), {response} (the
 *     candidate being critiqued, edited or scored), {feedback} (an edit's feedbacks, numbered
 *     "1. ...\n2. ..."). A '{' that does not open a {name} is plain text; an unknown {name},
 *     or one the role does not have, is an error. Values are inserted once and never scanned
 *     for placeholders again (a user typing "{response}" gets those characters).
 * What each role must use (an error at load otherwise):
 *   instruct   the conversation (@conversation or {prompt}); no {response} / {feedback}
 *   feedback   the conversation and {response}; no {feedback}
 *   edit       the conversation, {response} and {feedback}
 *   select     the conversation and {response}; no {feedback}
 * A system message of the conversation always ends up first: merged after the template's
 * @system text (a blank line between) when there is one.
 *
 * Owns the parsed templates. Never prints, never exits; every error names file:line.
 */
#ifndef ITS_TEMPLATES_H
#define ITS_TEMPLATES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

struct templates;

/* Largest template file read, in bytes. */
#define TEMPLATES_MAX_FILE_BYTES (1u << 20)

/* Loads and validates the four role templates. The file of role r is paths[r] when `paths`
 * and paths[r] are non-NULL, else "<dir>/<role name>.tmpl" (e.g. "configs/prompts/edit.tmpl").
 * Nothing is retained from the arguments. Returns 0 with *out set (free with
 * templates_destroy), or a negative enum proto_err with err naming the file and line:
 * PROTO_ERR_NOT_FOUND (cannot open/read), PROTO_ERR_TOO_LARGE (over
 * TEMPLATES_MAX_FILE_BYTES), PROTO_ERR_BAD_FIELD (bad content), PROTO_ERR_NO_MEMORY. */
int templates_load(const char *dir, const char *const paths[PROTO_ROLE_COUNT],
                   struct templates **out, char *err, size_t err_len);

/* Frees the templates. NULL-safe; clears *t. */
void templates_destroy(struct templates **t);

/* The path a role's template was read from (owned by t). */
const char *templates_path(const struct templates *t, enum proto_role role);

/* Whether role `role` has the same template in a and b: read from the same path, with the
 * same sections and text (what a reload compares to say which templates changed). */
bool templates_same(const struct templates *a, const struct templates *b, enum proto_role role);

/* Renders the message list of one job of `role`.
 *   conversation  the user's conversation (n_conversation >= 1 messages, with at least one
 *                 user message); copied, not retained.
 *   response      the draft / candidate text; required by feedback, edit and select, ignored
 *                 (may be NULL) for instruct.
 *   feedbacks     the edit's feedbacks (n_feedbacks >= 1 for edit; ignored otherwise), each
 *                 trimmed and numbered from 1.
 * On success *out is a malloc'd array of *n_out messages whose contents are malloc'd (free
 * with templates_messages_free, or hand them to a struct proto_msg freed by proto_msg_free).
 * Returns 0, or PROTO_ERR_BAD_FIELD (missing input), PROTO_ERR_TOO_LARGE (a message over
 * PROTO_MAX_STRING_BYTES or more than PROTO_MAX_MESSAGES messages), PROTO_ERR_NO_MEMORY; err
 * names the template file and section line. *out is NULL on error. */
int templates_render(const struct templates *t, enum proto_role role,
                     const struct proto_chat_msg *conversation, uint32_t n_conversation,
                     const char *response, const char *const *feedbacks, uint32_t n_feedbacks,
                     struct proto_chat_msg **out, uint32_t *n_out, char *err, size_t err_len);

/* Frees an array from templates_render (n messages). NULL-safe; clears *msgs. */
void templates_messages_free(struct proto_chat_msg **msgs, uint32_t n);

#endif
