// Byte-range locks for the `fs` import's set-range-lock and
// range-locked-elsewhere: Linux open-file-description locks
// (fcntl F_OFD_SETLK / F_OFD_GETLK), as the Rust and Python hosts take them.
// Node has no fcntl of its own and fs-ext's cannot set a range.
//
// An OFD lock belongs to the open file (not to the process): two opens of
// one file exclude each other in one process, so two driver instances in
// two worker threads do, and they conflict with native SQLite's classic
// POSIX locks held by other processes. Nothing here blocks.
//
// A Node-API module (context-aware): every worker thread loads its own.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <node_api.h>

#define CHECK(call)                                                   \
  do {                                                                \
    if ((call) != napi_ok) {                                          \
      napi_throw_error(env, "EINVAL", "range_lock: bad arguments");   \
      return NULL;                                                    \
    }                                                                 \
  } while (0)

static napi_value throw_errno(napi_env env, int err, const char *call) {
  // An Error whose `errno` is negative, as Node's own system errors are
  // (the JavaScript side names it with util.getSystemErrorName).
  napi_value msg, error, num;
  napi_create_string_utf8(env, call, NAPI_AUTO_LENGTH, &msg);
  napi_create_error(env, NULL, msg, &error);
  napi_create_int32(env, -err, &num);
  napi_set_named_property(env, error, "errno", num);
  napi_throw(env, error);
  return NULL;
}

/** fd (number), start and length (BigInt, checked by the caller to fit
 * off_t), and for setLock the kind (0 unlock, 1 shared, 2 exclusive). */
static bool range_args(napi_env env, napi_callback_info info, size_t want, int32_t *fd,
                       int64_t *start, int64_t *length, int32_t *kind) {
  size_t argc = 4;
  napi_value argv[4];
  bool lossless = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) return false;
  if (napi_get_value_int32(env, argv[0], fd) != napi_ok) return false;
  if (napi_get_value_bigint_int64(env, argv[1], start, &lossless) != napi_ok || !lossless) return false;
  if (napi_get_value_bigint_int64(env, argv[2], length, &lossless) != napi_ok || !lossless) return false;
  if (want == 4 && napi_get_value_int32(env, argv[3], kind) != napi_ok) return false;
  return *start >= 0 && *length >= 0;
}

#ifndef F_OFD_SETLK
#define F_OFD_SETLK (-1)
#define F_OFD_GETLK (-1)
#define RANGE_LOCK_UNAVAILABLE 1
#endif

/** setLock(fd, start, length, kind) -> true, or false when another open
 * file holds a conflicting lock. */
static napi_value set_lock(napi_env env, napi_callback_info info) {
  int32_t fd, kind = 0;
  int64_t start, length;
  if (!range_args(env, info, 4, &fd, &start, &length, &kind) || kind < 0 || kind > 2) {
    napi_throw_error(env, "EINVAL", "range_lock.setLock: bad arguments");
    return NULL;
  }
  struct flock lk;
  memset(&lk, 0, sizeof lk);
  lk.l_type = kind == 0 ? F_UNLCK : kind == 1 ? F_RDLCK : F_WRLCK;
  lk.l_whence = SEEK_SET;
  lk.l_start = (off_t)start;
  lk.l_len = (off_t)length;
  lk.l_pid = 0;
  bool done = true;
  if (fcntl(fd, F_OFD_SETLK, &lk) != 0) {
    if (errno == EAGAIN || errno == EACCES) done = false;
    else return throw_errno(env, errno, "fcntl(F_OFD_SETLK)");
  }
  napi_value result;
  CHECK(napi_get_boolean(env, done, &result));
  return result;
}

/** lockedElsewhere(fd, start, length) -> whether another open file holds
 * a lock on the range that conflicts with an exclusive one. */
static napi_value locked_elsewhere(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t start, length;
  if (!range_args(env, info, 3, &fd, &start, &length, NULL)) {
    napi_throw_error(env, "EINVAL", "range_lock.lockedElsewhere: bad arguments");
    return NULL;
  }
  struct flock lk;
  memset(&lk, 0, sizeof lk);
  lk.l_type = F_WRLCK;
  lk.l_whence = SEEK_SET;
  lk.l_start = (off_t)start;
  lk.l_len = (off_t)length;
  lk.l_pid = 0;
  if (fcntl(fd, F_OFD_GETLK, &lk) != 0) return throw_errno(env, errno, "fcntl(F_OFD_GETLK)");
  napi_value result;
  CHECK(napi_get_boolean(env, lk.l_type != F_UNLCK, &result));
  return result;
}

/** clearNonblock(fd): an open made with O_NONBLOCK (so a FIFO could not
 * block it), once known to be a regular file, loses the flag. */
static napi_value clear_nonblock(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 1) {
    napi_throw_error(env, "EINVAL", "range_lock.clearNonblock: bad arguments");
    return NULL;
  }
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return throw_errno(env, errno, "fcntl(F_GETFL)");
  if ((flags & O_NONBLOCK) && fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return throw_errno(env, errno, "fcntl(F_SETFL)");
  }
  return NULL;
}

NAPI_MODULE_INIT(/* napi_env env, napi_value exports */) {
#ifdef RANGE_LOCK_UNAVAILABLE
  // No open-file-description locks here (not Linux, or a libc before
  // them): an empty module, and range locks are `unsupported`.
  (void)set_lock;
  (void)locked_elsewhere;
  (void)clear_nonblock;
  return exports;
#endif
  napi_property_descriptor props[] = {
      {"setLock", NULL, set_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"lockedElsewhere", NULL, locked_elsewhere, NULL, NULL, NULL, napi_enumerable, NULL},
      {"clearNonblock", NULL, clear_nonblock, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  return exports;
}
