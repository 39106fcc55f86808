// core/knobs.h: every FLASHATTN_* switch parses what README.md documents and names the variable
// when it does not know a value.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/knobs.h"
#include "flashattn/error.h"

namespace {

using flashattn::KernelChoice;
using flashattn::Knobs;
using flashattn::knobs_from_environment;
using flashattn::Override;

// Sets one variable for the lifetime of the guard.
class Env {
 public:
  Env(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~Env() { unsetenv(name_); }

 private:
  const char* name_;
};

TEST(Knobs, DefaultsWithAnEmptyEnvironment) {
  const Knobs k = knobs_from_environment();
  EXPECT_EQ(k.cuda_forward, KernelChoice::kAuto);
  EXPECT_EQ(k.cuda_backward, KernelChoice::kAuto);
  EXPECT_TRUE(k.cuda_decode);
  EXPECT_FALSE(k.cuda_small_tiles);
  EXPECT_EQ(k.sm90_narrow, Override::kAuto);
  EXPECT_EQ(k.sm90_persistent, Override::kAuto);
  EXPECT_EQ(k.sm90_max_ctas, 0);
  EXPECT_FALSE(k.sm90_pingpong);
}

TEST(Knobs, ParsesEveryDocumentedValue) {
  Env a("FLASHATTN_CUDA_FORWARD", "sm80"), b("FLASHATTN_CUDA_BACKWARD", "sm90"), c("FLASHATTN_CUDA_DECODE", "0"),
      d("FLASHATTN_CUDA_SMALL_TILES", "1"), e("FLASHATTN_SM90_NARROW", "0"), f("FLASHATTN_SM90_PERSISTENT", "1"),
      g("FLASHATTN_SM90_MAX_CTAS", "7"), h("FLASHATTN_SM90_SCHEDULE", "pingpong"), i("FLASHATTN_CPU_ISA", "avx2");
  const Knobs k = knobs_from_environment();
  EXPECT_EQ(k.cuda_forward, KernelChoice::kSm80);
  EXPECT_EQ(k.cuda_backward, KernelChoice::kSm90);
  EXPECT_FALSE(k.cuda_decode);
  EXPECT_TRUE(k.cuda_small_tiles);
  EXPECT_EQ(k.sm90_narrow, Override::kOff);
  EXPECT_EQ(k.sm90_persistent, Override::kOn);
  EXPECT_EQ(k.sm90_max_ctas, 7);
  EXPECT_TRUE(k.sm90_pingpong);
  EXPECT_EQ(k.cpu_isa, "avx2");
}

TEST(Knobs, UnknownValuesNameTheVariable) {
  for (const auto& [name, value] : {std::pair{"FLASHATTN_CUDA_FORWARD", "sm75"}, {"FLASHATTN_CUDA_BACKWARD", "fast"},
                                    {"FLASHATTN_SM90_NARROW", "yes"}, {"FLASHATTN_SM90_MAX_CTAS", "-3"},
                                    {"FLASHATTN_SM90_SCHEDULE", "serial"}, {"FLASHATTN_CPU_ISA", "sse9"}}) {
    Env env(name, value);
    try {
      knobs_from_environment();
      ADD_FAILURE() << name << "=" << value << " was accepted";
    } catch (const flashattn::Unsupported& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  }
}

}  // namespace
