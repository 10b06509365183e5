/* A skewed wall clock for one process and its children (LD_PRELOAD), for the clock-skew
 * fault scenario (tests/faults/test_clocks.py).
 *
 * Every read of the wall clock through libc -- clock_gettime(CLOCK_REALTIME and its
 * variants), gettimeofday(), time() -- is shifted by SKEWCLOCK_OFFSET seconds (a decimal,
 * may be negative). Monotonic clocks are left alone: sleeps, timeouts and condition waits
 * keep working (libfaketime 0.9.10 breaks them under Python 3.11: with its monotonic faking
 * on, Event.wait never returns; with it off, time.sleep fails with EINVAL). A test host's
 * monotonic clock is offset separately, by a time namespace (unshare --time).
 *
 * Build: cc -shared -fPIC -O2 -o skewclock.so skewclock.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long offset_ns(void) {
    static int ready;
    static long long ns;
    if (!ready) {  /* a benign race: every thread computes the same value */
        const char *raw = getenv("SKEWCLOCK_OFFSET");
        ns = raw ? (long long)(strtod(raw, NULL) * 1e9) : 0;
        ready = 1;
    }
    return ns;
}

static void shift(struct timespec *ts) {
    long long t = ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns();
    ts->tv_sec = t / 1000000000LL;
    ts->tv_nsec = t % 1000000000LL;
}

static int is_wall(clockid_t id) {
    return id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE || id == CLOCK_TAI;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int result = real(id, ts);
    if (result == 0 && is_wall(id)) shift(ts);
    return result;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    (void)tz;  /* obsolete; glibc ignores it too */
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
    tv->tv_sec = ts.tv_sec;  /* never NULL: glibc declares it nonnull */
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return (time_t)-1;
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
